"""Layering, checked on the source (an AST walk, imports inside functions included): no import cycles,
the library never imports the CLI, and nothing below the KnowledgeBase facade imports it."""

import ast
import os

from conftest import ROOT

PKG = os.path.join(ROOT, "writeback_rag")
FRONT_ENDS = {"cli", "demo", "eval", "server", "mcp_server"}  # built on the facade: they may import it


def imports():
    """{module: {imported sibling modules}} for every module of the package."""
    out = {}
    for name in sorted(os.listdir(PKG)):
        if not name.endswith(".py"):
            continue
        mod = name[:-3]
        tree = ast.parse(open(os.path.join(PKG, name), encoding="utf-8").read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("writeback_rag"):
                parts = node.module.split(".")
                deps.add(parts[1] if len(parts) > 1 else "__init__")
        out[mod] = deps - {mod}
    return out


def test_no_import_cycles():
    graph = imports()
    graph.pop("__init__")  # the package's public re-exports sit on top of everything
    for deps in graph.values():
        deps.discard("__init__")
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for d in sorted(graph.get(m, ())):
            assert state.get(d) != "open", "import cycle: " + " -> ".join(path[path.index(d):] + [d])
            if d not in state:
                visit(d)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_library_never_imports_the_cli_or_the_facade_from_below():
    graph = imports()
    for mod, deps in graph.items():
        if mod not in FRONT_ENDS:
            assert "cli" not in deps, f"{mod} imports the CLI"
        if mod not in FRONT_ENDS | {"__init__", "kb"}:
            assert "kb" not in deps and "__init__" not in deps, f"{mod} imports the KnowledgeBase facade"


def test_services_use_the_facade_only_through_public_names():
    """Feedback and write-back receive the KnowledgeBase; they write through kb.corpus and never reach into
    the facade's private state (kb._...), so the facade can change without breaking them."""
    for name in sorted(os.listdir(PKG)):
        mod = name[:-3]
        if not name.endswith(".py") or mod in FRONT_ENDS | {"kb", "__init__"}:
            continue
        tree = ast.parse(open(os.path.join(PKG, name), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "kb":
                assert not node.attr.startswith("_"), f"{mod}.py line {node.lineno}: kb.{node.attr}"
