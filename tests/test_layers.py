"""The module layering (pyproject.toml's import-linter contract has the order): every
module of emu can be imported first, on its own, and no function imports a module to
dodge an import circle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import emu

PKG = Path(emu.__file__).parent
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__"))

#: (file, module) pairs allowed inside a function: the pytest plugin is loaded by every
#: pytest run in an environment where emu is installed, and must not import emu then.
LAZY_OK = {("pytest_plugin.py", "emu"), ("pytest_plugin.py", "emu.image")}

# Import emu.NAME first, with the package's __init__ out of the way (an empty package
# object), so that the module's own imports alone must bring in everything it needs.
_BARE_IMPORT = """
import importlib, sys, types
pkg = types.ModuleType("emu")
pkg.__path__ = [sys.argv[1]]
sys.modules["emu"] = pkg
importlib.import_module("emu." + sys.argv[2])
"""


def test_each_module_imports_first_in_a_fresh_interpreter() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    procs = {
        name: subprocess.Popen([sys.executable, "-c", _BARE_IMPORT, str(PKG), name],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for name in MODULES
    }
    failed = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=30)
        if proc.returncode != 0:
            failed[name] = out.decode(errors="replace").strip().splitlines()[-1:]
    assert not failed, f"modules that cannot be imported first: {failed}"


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for func in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Import):
                found += [(node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                found.append((node.lineno, module))
    return found


def test_no_function_level_imports() -> None:
    found = [
        f"emu/{path.relative_to(PKG)}:{line}: {module}"
        for path in sorted(PKG.rglob("*.py"))
        for line, module in _function_level_imports(path)
        if (path.name, module) not in LAZY_OK
    ]
    assert not found, "imports inside functions (move them up; fix the layering):\n" + \
        "\n".join(found)


def test_no_import_below_code() -> None:
    found = [f"emu/{p.relative_to(PKG)}" for p in sorted(PKG.rglob("*.py"))
             if "noqa: E402" in p.read_text()]
    assert not found, f"late imports (an import circle held together): {found}"


def test_every_shared_record_field_is_typed() -> None:
    """mypy --strict sees a record's fields through its annotations: a field added to a
    record's _fields_ without one would be typed Any and escape the check."""
    import ctypes

    from emu import image

    records = [v for v in vars(image).values()
               if isinstance(v, type) and issubclass(v, ctypes.Structure)
               and v.__module__ == image.__name__]
    assert len(records) > 10
    untyped = {r.__name__: sorted({name for name, *_ in r._fields_} - set(r.__annotations__))
               for r in records}
    assert not {k: v for k, v in untyped.items() if v}, untyped


def test_the_package_exports_exactly_its_public_names() -> None:
    public = {n for n, v in vars(emu).items()
              if not n.startswith("_") and not isinstance(v, type(emu))} - {"annotations"}
    assert set(emu.__all__) - {"__version__"} == public


def test_the_typed_view_of_the_image_lists_every_table() -> None:
    """image.ImageView is what mypy checks image accesses against: a table added to
    image_type() without it would be typed as missing."""
    from emu import image

    fields = {name for name, *_ in image.image_type(1, 1, 1, 1, 1)._fields_}
    assert set(image.ImageView.__annotations__) == fields
