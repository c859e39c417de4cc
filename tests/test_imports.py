"""The shape of the code: imports go one way (no circles, nothing imports a layer above it), and the commands that
only print (`--help`, `list`) import no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qharness"
# Lowest first: a module may import modules of its own layer and of the layers below, never above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("qharness.core", "qharness.stats"),
    ("qharness.data",),
    ("qharness.models", "qharness.tasks"),
    ("qharness.activations", "qharness.quant"),
    ("qharness.training",),
    ("qharness.experiment",),
    ("qharness.report",),
    ("qharness.cli", "qharness.__main__"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every qharness module `path` imports, at the top, inside a function or under `if TYPE_CHECKING:` (all three
    are dependencies: a type named from a module above is a layer leak, and a circle hidden behind TYPE_CHECKING is
    a circle a reader still has to follow)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y: relative to the package, one level up per extra dot
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    # `from qharness import provenance` names the package only to reach the submodule, which is the dependency
    return {module_name(path): imports_of(path, modules) - {module_name(path), "qharness"} for path in paths}


def layer_of(module: str) -> int | None:
    matches = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


def test_every_module_has_a_layer():
    unplaced = [m for m in import_graph() if m != "qharness" and layer_of(m) is None]
    assert not unplaced, f"add these modules to LAYERS: {unplaced}"


def test_no_module_imports_a_layer_above_its_own():
    upward = [(module, target) for module, targets in import_graph().items() if module != "qharness"
              for target in targets if layer_of(target) > layer_of(module)]
    assert not upward, f"imports that run up the layers: {upward}"


def test_the_import_graph_has_no_circles():
    graph = import_graph()
    # a package's __init__ importing its own submodules (auto-registration) is how registries fill, not a circle
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import circles: {cycles}"


def test_the_checker_sees_function_level_imports(tmp_path):
    """The graph includes imports inside functions: a circle hidden in a function body still counts."""
    graph = import_graph()
    assert "qharness.models.loading" in graph["qharness.models.sources"]  # imported inside load_model
    assert "qharness.training.ensure" in graph["qharness.experiment.execute"]


def test_the_checker_sees_type_checking_imports():
    """`if TYPE_CHECKING:` imports are edges too: sim.py once took QuantContext from backend.py that way, hiding the
    circle backend.py -> sim.py -> backend.py. plots.py names Profile only for its annotations."""
    assert "qharness.activations.profile" in import_graph()["qharness.activations.plots"]
    assert "qharness.quant.backends" not in import_graph()["qharness.quant.sim"]


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["train", "--help"], ["list"], ["list", "models"],
                                  ["list", "quants"], ["list", "kv"], ["list", "backends"], ["list", "tasks"],
                                  ["list", "transforms"], ["list", "mitigations"]])
def test_help_and_list_import_no_torch(argv):
    code = (f"import sys\nfrom qharness.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
