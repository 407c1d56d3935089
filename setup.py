"""Only the C extension lives here; all other metadata is in pyproject.toml.

The extension is the top-level module ``_emu_native``, not ``emu._native``: the Python
package is then the same code wherever it is imported from. ``python -m emu`` and
``python -m pytest`` run from a source checkout put the checkout's ``emu/`` (which has
no build products) first on ``sys.path``; it still finds the installed compiled part.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "_emu_native",
            ["native/module.c", "native/atomic.c", "native/lock.c", "native/waitcore.c",
             "native/irqcore.c", "native/slab.c", "native/trace.c"],
            depends=["native/emu.h"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra",
                                "-Wno-unused-parameter"],
        )
    ],
)
