"""The anima_lib import graph, read from the source (every import statement, function-local ones included): no
circle, and the loading stack (networks <- checkpoints <- models <- nano_world.teacher) imports at module top only."""
import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "anima_lib"
# modules that import only at top level: the loading stack and the helpers it was untangled with
TOP_LEVEL_ONLY = ["anima_lib.networks", "anima_lib.models", "anima_lib.checkpoints", "anima_lib.nano_world.teacher",
                  "anima_lib.comfy_keys", "anima_lib.flow", "anima_lib.sampler", "anima_lib.text"]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_targets(node, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package modules one import statement loads: `from . import flow` is anima_lib.flow, `from .x import y`
    is anima_lib.x (or anima_lib.x.y when y is a module)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    targets = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {t for t in targets if t in known}


def import_graph(root: Path = LIB) -> tuple[dict[str, set[str]], dict[str, list[tuple[str, set[str], str]]]]:
    """{module: package modules it imports anywhere in its source},
    {module: [('line: statement', package modules it loads, function) for each function-local import]}."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    graph, local = {}, {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= import_targets(node, module, path.name == "__init__.py", known)
        graph[module] = edges - {module}
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local[module] = local.get(module, []) + [
                    (f"{node.lineno}: {ast.unparse(node)}", import_targets(node, module, path.name == "__init__.py",
                                                                           known), function.name)
                    for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom))]
    return graph, local


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as [a, b, ..., a], or [] when the graph is acyclic (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_anima_lib_import_graph_has_no_circle():
    graph, _ = import_graph()
    assert find_cycle(graph) == [], f"import circle: {' -> '.join(find_cycle(graph))}"


def test_the_graph_sees_the_loading_stack():
    """The reader finds real edges (a parser that saw nothing would pass the test above vacuously)."""
    graph, _ = import_graph()
    assert {"anima_lib.checkpoints", "anima_lib.networks"} <= graph["anima_lib.models"]
    assert "anima_lib.networks" in graph["anima_lib.checkpoints"]
    assert {"anima_lib.models", "anima_lib.networks"} <= graph["anima_lib.nano_world.teacher"]
    assert "anima_lib.models" not in graph["anima_lib.checkpoints"] | graph["anima_lib.networks"]


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_loading_a_real_checkpoint_imports_no_nano_only_code():
    """models (what every stage imports) reaches neither the renderer nor the probes (real runs never import them)."""
    graph, _ = import_graph()
    nano_only = {"anima_lib.nano_world.renderer", "anima_lib.nano_world.probes", "anima_lib.nano_world.detail_reader",
                 "anima_lib.nano_world.teacher"}
    assert reachable(graph, "anima_lib.models") & nano_only == set()


def test_a_function_local_import_circle_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .sub.c import f\n")
    (pkg / "sub" / "c.py").write_text("def f():\n    from ..a import g\n")
    graph, local = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    assert local["pkg.sub.c"] == [("2: from ..a import g", {"pkg.a"}, "f")]


@pytest.mark.parametrize("module", TOP_LEVEL_ONLY)
def test_the_loading_stack_imports_at_module_top_only(module):
    _, local = import_graph()
    assert local.get(module, []) == [], f"{module}: function-local imports {[i[0] for i in local[module]]}"


def test_the_library_imports_itself_at_module_top_but_for_three_documented_reasons():
    """Inside functions only: the CLI's commands (`anima --help` loads no torch), a `python -m` entry point's `main`
    (a measuring subprocess imports after its baseline), and the nano-only world (renderer, probes, detail reader,
    creature sampling), which a real run must never load (tests/full_width.py guards it)."""
    _, local = import_graph()
    hidden = [f"{module}:{text}" for module, imports in local.items() if module != "anima_lib.cli"
              for text, targets, function in imports if function not in ("main", "_main")
              and any(not t.startswith("anima_lib.nano_world.") for t in targets)]
    assert hidden == []


def defined_names(module: str) -> list[str]:
    """The public names a module's source defines at top level (functions, classes, constants)."""
    tree = ast.parse((LIB.parent / (module.replace(".", "/") + ".py")).read_text())
    names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    names += [t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
              for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)]
    return [n for n in names if not n.startswith("_")]


def test_models_re_exports_every_public_network_name():
    """Notebooks and stages keep calling `models.X` for what lives in `networks`: the same object under both names."""
    from anima_lib import models, networks
    public = defined_names("anima_lib.networks")
    assert {"AnimaComponents", "DTYPES", "transformer_velocity", "velocity_fn"} <= set(public)
    assert [n for n in public if getattr(models, n, None) is not getattr(networks, n)] == []
