"""The layering docs/ARCHITECTURE.md describes, checked from the source: no import cycle among the
`cliperase.*` modules (function-local imports included), kernels/ imports nothing of engine/, the
library never imports launch/, and no function in engine/ is longer than a screen."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

import pytest

from helpers import tiny_data  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"cliperase.engine": ROOT / "engine", "cliperase.kernels": ROOT / "kernels"}
MAX_FUNCTION_LINES = 80


def _modules() -> Dict[str, Path]:
    """{dotted module name: file} of every module of the installed packages."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The cliperase modules `name` imports anywhere in its file (annotations-only blocks aside)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    skip = {id(n) for block in ast.walk(tree) if _type_checking_only(block) for n in ast.walk(block)}
    found: Set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from pkg import sub` needs the submodule `pkg.sub`; `from pkg import name` pkg itself.
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(target)
    found |= _lazy_exports(name, tree, is_package)
    # `x = lazy_import("cliperase.kernels")` (engine/lazy.py) imports at first use: an edge too.
    found |= {n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) ==
              "lazy_import" and n.args and isinstance(n.args[0], ast.Constant)}
    return {m for m in found if m in modules and m != name}


def _lazy_exports(name: str, tree: ast.Module, is_package: bool) -> Set[str]:
    """A package's `_EXPORTS = {"public name": "submodule", ...}` (engine/lazy.py lazy_exports):
    each name imports its submodule on first use, an import edge like any other."""
    out: Set[str] = set()
    for node in tree.body:
        if is_package and isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            out |= {f"{name}.{v}" for v in ast.literal_eval(node.value).values()}
    return out


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected component of more than one module (Tarjan), as sorted lists."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 30, "the module walk found too few modules"
    assert "cliperase.kernels.clip_infonce" in graph["cliperase.kernels"], "lazy exports are import edges"
    assert _cycles(graph) == []


def test_checking_a_config_imports_neither_torch_nor_open_clip(tiny_data, tmp_path):
    """What the CLI needs to refuse bad input (config, preflight) loads no heavy library: a fresh
    interpreter checks a config and reports which modules ran."""
    import json
    import subprocess
    import sys

    code = f"""
import json, sys
from cliperase.engine import preflight
from cliperase.engine.config import UnlearnConfig
cfg = UnlearnConfig.from_dict(dict(forget_data="{tiny_data / 'forget'}", retain_data="{tiny_data / 'retain'}",
                                   eval_data="{tiny_data / 'eval'}", forget_classes=["circle"], steps=0,
                                   output_dir="{tmp_path / 'out'}"))
problems = preflight.problems(cfg)
from cliperase.engine import ConfigError, unlearn
try:
    unlearn(cfg)  # the engine's own entry point refuses as cheaply
except ConfigError as exc:
    assert exc.problems == problems, exc.problems
else:
    raise AssertionError("unlearn accepted steps=0")
print(json.dumps({{"problems": problems, "loaded": [m for m in ("torch._C", "open_clip", "webdataset", "transformers",
                                                              "deepspeed", "triton") if m in sys.modules]}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["problems"] == ["steps: expected a positive integer, got 0"]
    assert result["loaded"] == []


def test_kernels_import_nothing_of_the_engine_and_nothing_imports_launch():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("cliperase.kernels"):
            assert not any(d.startswith("cliperase.engine") for d in deps), (name, deps)
    for path in list(ROOT.joinpath("engine").rglob("*.py")) + list(ROOT.joinpath("kernels").rglob("*.py")):
        assert not re.search(r"^\s*(from|import)\s+launch\b", path.read_text(), re.M), path


@pytest.mark.parametrize("package", ["engine"])
def test_no_function_in_the_engine_is_longer_than_a_screen(package):
    long = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
