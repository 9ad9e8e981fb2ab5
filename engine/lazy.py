"""Modules imported at first use, for the code the validation layer loads.

`preflight.problems(cfg)` must answer in well under a second (a refused command line costs what
it imports, and importing torch alone takes ~2.5 s on a 2-core machine), yet it reads modules
whose other functions need torch: a method's options beside its objective, an evaluation set's
checks beside its loader. Those modules take torch as `torch = lazy_import("torch")`: the name
is bound at once, the library is imported when code first touches it. The stdlib's
`importlib.util.LazyLoader` does the deferring; a library someone imported already is returned
as it is.
"""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any, Callable, Mapping, Tuple

__all__ = ["lazy_import", "lazy_exports"]


def lazy_import(name: str) -> ModuleType:
    """The module `name`, executed on its first attribute access (at once if already imported).
    Raises ModuleNotFoundError at once when it is not installed."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    parent, _, child = name.rpartition(".")
    if parent:  # as the import system does: `import a.b` leaves `b` an attribute of `a`
        setattr(sys.modules[parent], child, module)
    return module


def lazy_exports(package: str, exports: Mapping[str, str]) -> Tuple[Callable[[str], Any], Callable[[], list]]:
    """`(__getattr__, __dir__)` for a package whose public names live in submodules
    (`exports`: {name: "submodule"}), each submodule imported when one of its names is first
    read (PEP 562): importing a light submodule of the package then costs only that submodule.
    tests/test_architecture.py reads the `exports` dict as import edges."""
    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list:
        return sorted(set(exports) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
