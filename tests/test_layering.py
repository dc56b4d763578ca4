"""samtone's layers: no import cycle inside samtone/; serving and the library never import the
CLI (a static check of the import statements, no module is imported)."""
import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "samtone"


def _imports():
    """module -> the samtone modules it imports (at any depth in the file)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module] = {name for name in found if name.startswith("samtone")}
    known = set(graph)
    return {module: {name for name in names if name in known and name != module}
            for module, names in graph.items()}


def _cycle(graph):
    state = {}

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target] if target in stack else [target]
            if target not in state:
                found = visit(target, stack + [target])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_no_import_cycle_inside_samtone():
    graph = _imports()
    # Packages import their own modules from __init__; that is not a cycle of layers.
    for package in ("samtone", "samtone.data", "samtone.checkpoints", "samtone.models",
                    "samtone.cli", "samtone.export", "samtone.analysis"):
        graph[package] = {m for m in graph.get(package, set())
                          if not m.startswith(package + ".")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def _analysis_imports(module):
    """The samtone.analysis names `module` (a file of samtone/analysis/) imports."""
    tree = ast.parse((PACKAGE / "analysis" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "samtone.analysis"):
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("samtone.analysis"))
    return found


def test_analysis_layers_import_downward_only():
    """statistics (numpy) <- figures (matplotlib) <- the package's orchestration."""
    assert _analysis_imports("statistics") == set()
    assert _analysis_imports("figures") == {"samtone.analysis.statistics"}


def test_the_cli_layer_is_on_top_and_serving_is_apart_from_training():
    graph = _imports()
    for module, names in graph.items():
        if not module.startswith("samtone.cli"):
            assert not [n for n in names if n.startswith("samtone.cli")], module
    for serving in ("samtone.inference", "samtone.export", "samtone.mine", "samtone.analysis",
                    "samtone.evaluate", "samtone.run_manifest", "samtone.search",
                    "samtone.encoding", "samtone.checkpoints.convert", "samtone.compare"):
        closure, todo = set(), [serving]
        while todo:
            for name in graph.get(todo.pop(), ()):
                if name not in closure:
                    closure.add(name)
                    todo.append(name)
        assert not {"samtone.optimizers", "samtone.train", "samtone.train_step"} & closure, serving
    for path in PACKAGE.rglob("*.py"):
        if "cli" not in path.parts:
            assert "import gin" not in path.read_text(), path


def test_compare_reads_files_without_the_model_stack():
    """samtone.compare (samtone-compare's logic) tests JSON files: none of the modules it
    reaches imports JAX, Flax or the evaluation that does (tests/test_compare.py also checks
    at run time that importing it loads no jax)."""
    graph = _imports()
    closure, todo = set(), ["samtone.compare"]
    while todo:
        for name in graph.get(todo.pop(), ()):
            if name not in closure:
                closure.add(name)
                todo.append(name)
    assert "samtone.evaluate" not in closure and "samtone.inference" not in closure
    for module in closure | {"samtone.compare"}:
        path = PACKAGE.joinpath(*module.split(".")[1:])
        source = (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text()
        assert not re.search(r"^\s*(import|from)\s+(jax|flax)\b", source, re.M), module
