"""cliperase.kernels has no import cycle, counting function-local (lazy) imports.

The graph is read from the source with `ast` (every `import` statement, at any depth), not from
`sys.modules`, so a lazy import that would close a cycle only at run time is caught too.
"""
import ast
from pathlib import Path

import cliperase.kernels

PACKAGE = "cliperase.kernels"
ROOT = Path(cliperase.kernels.__file__).parent


def _module_name(path: Path) -> str:
    return "__init__" if path.stem == "__init__" else path.stem


def _edges(path: Path, modules: set) -> set:
    """The package's modules that `path` imports (anywhere in the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            absolute = node.module or ""
            if node.level == 1:
                base = absolute
            elif node.level == 0 and absolute.startswith(PACKAGE):
                base = absolute[len(PACKAGE) + 1 :]
            else:
                continue
            if base:
                out.add(base.split(".")[0])
            else:  # `from . import x`: x is a submodule, or a name from __init__
                out.update(a.name if a.name in modules else "__init__" for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    out.add(alias.name[len(PACKAGE) + 1 :].split(".")[0])
    return out & modules


def _graph() -> dict:
    files = sorted(ROOT.glob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _edges(f, modules) for f in files}


def _cycle(graph: dict):
    """One cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_in_kernels():
    graph = _graph()
    # The walk sees what it must: the lazy Triton import and the shared layout module.
    assert "_triton_contrastive" in graph["_contrastive"]
    assert "_layout" in graph["_triton_contrastive"] and "_layout" in graph["_contrastive"]
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
