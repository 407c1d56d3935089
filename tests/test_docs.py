"""The documentation: it builds with Sphinx, warnings as errors (tools/docs in CI), and
nothing in the package or the README points to documents outside the repository."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

import emu

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_no_reference_to_documents_outside_the_repository():
    files = [ROOT / "README.md", *sorted((ROOT / "emu").rglob("*.py"))]
    for path in files:
        text = path.read_text()
        for outside in ("API.md", "design notes", "DESIGN"):
            assert outside not in text, f"{path.relative_to(ROOT)} mentions {outside!r}"


def test_every_public_attribute_has_a_docstring():
    kernel_attrs = [name for name, value in vars(emu.Kernel).items()
                    if not name.startswith("_")
                    and (callable(value) or isinstance(value, property))]
    missing = [f"Kernel.{name}" for name in kernel_attrs
               if not getattr(emu.Kernel, name).__doc__]
    for name in dir(emu):
        obj = getattr(emu, name)
        if not name.startswith("_") and callable(obj) and not obj.__doc__:
            missing.append(name)
    assert not missing


def test_the_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="the docs extra: pip install '.[docs]'")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(ROOT / "docs"), str(tmp_path / "html")],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "first_reports" in (tmp_path / "html" / "api" / "kernel.html").read_text()


def test_every_module_of_the_public_api_has_a_reference_page():
    """Each module a name of emu.__all__ comes from is documented by an automodule."""
    documented = set()
    for page in (ROOT / "docs" / "api").glob("*.rst"):
        for line in page.read_text().splitlines():
            if line.startswith(".. automodule:: "):
                documented.add(line.split()[-1])
    sources = {getattr(emu, name).__module__ for name in emu.__all__
               if hasattr(getattr(emu, name), "__module__")
               and getattr(getattr(emu, name), "__module__", "").startswith("emu.")}
    assert sources - documented == set(), f"no API page for {sorted(sources - documented)}"
