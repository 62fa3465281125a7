"""Layering, checked on the source (an AST walk, imports inside functions included): no import cycles,
the library never imports the CLI, and nothing below the KnowledgeBase facade imports it."""

import ast
import os

from conftest import ROOT

PKG = os.path.join(ROOT, "writeback_rag")
FRONT_ENDS = {"cli", "demo", "eval", "server", "mcp_server", "integrations"}  # built on the facade: may import it


def modules():
    """{dotted module name within the package: path}, subpackages included ("store", "store.changes")."""
    out = {}
    for folder, _, files in os.walk(PKG):
        rel = os.path.relpath(folder, PKG)
        prefix = "" if rel == "." else rel.replace(os.sep, ".") + "."
        if "__pycache__" in rel:
            continue
        for name in sorted(files):
            if name.endswith(".py"):
                mod = prefix + name[:-3]
                out[mod[:-len(".__init__")] if mod.endswith(".__init__") else mod] = os.path.join(folder, name)
    return out


def imports():
    """{module: {imported modules of the package}} for every module (a subpackage's modules by dotted name),
    resolving relative imports; `from . import x` names module x where it is one."""
    mods = modules()
    out = {}
    for mod, path in mods.items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        package = "" if mod == "__init__" else mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("writeback_rag"):
                target = node.module.partition(".")[2]
            else:
                continue
            for a in node.names:  # `from . import store` imports a module; `from .x import f` imports x
                sub = f"{target}.{a.name}" if target else a.name
                deps.add(sub if sub in mods else target or "__init__")
        out[mod] = deps - {mod}
    return out


def test_no_import_cycles():
    graph = imports()
    graph.pop("__init__")  # the package's public re-exports sit on top of everything
    graph["store"] -= {"store.records"}  # store/__init__ re-exports Records at its end; records uses store's helpers
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
        top = mod.split(".")[0]
        if top not in FRONT_ENDS:
            assert "cli" not in deps, f"{mod} imports the CLI"
        if top not in FRONT_ENDS | {"__init__", "kb"}:
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


RETRIEVAL = {"index", "indexes", "milvus", "ranking", "filters"}  # the derived indexes and the ranking features
SQL = ("execute", "executemany", "executescript", "cursor")


def test_all_sql_lives_in_the_store_package():
    """Every statement is a function of store/ named for what it does: the services call those, and the
    indexes are handed a store.Records, so a second record store replaces store/ and nothing else."""
    for mod, path in modules().items():
        if mod == "store" or mod.startswith("store."):
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in SQL:
                raise AssertionError(f"{mod}.py line {node.lineno}: .{node.attr}() outside store/")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if getattr(node, "module", None) else [])
                assert not {"sqlite3", "sqlite_utils"} & set(names) or mod == "kb", \
                    f"{mod}.py line {node.lineno}: imports a database driver"


def test_the_store_and_the_retrieval_layer_never_import_each_other():
    """The indexes read the records only through the Records they are handed; the store knows no index."""
    graph = imports()
    for mod in RETRIEVAL:
        assert not any(d == "store" or d.startswith("store.") for d in graph[mod]), \
            f"{mod} imports the store package (it should be handed a Records)"
    for mod, deps in graph.items():
        if mod == "store" or mod.startswith("store."):
            assert not deps & RETRIEVAL, f"{mod} imports {deps & RETRIEVAL}"
