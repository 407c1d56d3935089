"""Only the C extension lives here; all other metadata is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "emu._native",
            ["native/emu_native.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
        )
    ],
)
