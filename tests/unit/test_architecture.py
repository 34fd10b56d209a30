"""The layout's contracts (docs/architecture.md): no import cycle, small modules, the only
module that touches DeepSpeed internals, and pure math free of DeepSpeed."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("maml_ds", "launcher")
MAX_LINES = 600
# Long by nature: the generator of six task families and the meta-gradient in all its modes.
LONG_MODULES = {"maml_ds/data/synth.py", "maml_ds/meta/gradient.py"}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        root = REPO / package
        found[package] = root / "__init__.py"
        for info in pkgutil.walk_packages([str(root)], prefix=f"{package}."):
            spec = importlib.util.find_spec(info.name)
            assert spec is not None and spec.origin is not None, info.name
            found[info.name] = Path(spec.origin)
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports, at any depth of its code (lazy imports count)."""
    out: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{alias.name}" for alias in node.names]
        for target in targets:
            # the deepest project module the import names (a name imported from a package
            # is that package unless it is itself a submodule)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = GREY
        stack.append(node)
        for nxt in sorted(graph[node]):
            if color[nxt] == GREY:
                return stack[stack.index(nxt) :] + [nxt]
            if color[nxt] == WHITE and (found := visit(nxt)):
                return found
        stack.pop()
        color[node] = BLACK
        return None

    for node in sorted(graph):
        if color[node] == WHITE and (found := visit(node)):
            return found
    return None


def test_every_module_imports():
    for name in _modules():
        importlib.import_module(name)


def test_import_graph_is_acyclic():
    graph = _graph()
    # Edges from a submodule up to its own package __init__ are how Python imports work, not
    # design cycles: drop them, keep everything else (lazy imports inside functions included).
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_detection_catches_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_are_small(package):
    too_long = []
    for path in sorted((REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and rel not in LONG_MODULES:
            too_long.append(f"{rel} ({lines} lines)")
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


DEEPSPEED_INTERNALS = (
    "round_robin_bit16_groups",
    "parallel_partitioned_bit16_groups",
    "round_robin_bit16_offsets",
    "bit16_groups_flat",
    "single_partition_of_fp32_groups",
    "fp16_groups",
    "fp32_partitioned_groups_flat",
    "ds_tensor",
    "ds_shape",
    "partition_numel",
    "parameter_offload",
)


def test_deepspeed_internals_only_in_zero_layout():
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel == "maml_ds/training/zero_layout.py":
                continue
            text = path.read_text()
            offenders += [f"{rel}: {name}" for name in DEEPSPEED_INTERNALS if name in text]
    assert not offenders, f"DeepSpeed internals outside training/zero_layout.py: {offenders}"


def _third_party_imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_meta_is_pure_math():
    graph, modules = _graph(), _modules()
    for name, targets in graph.items():
        if not name.startswith("maml_ds.meta"):
            continue
        outside = {t for t in targets if not t.startswith("maml_ds.meta")}
        assert not outside, f"{name} imports {outside}: maml_ds.meta must stand alone"
        assert "deepspeed" not in _third_party_imports(modules[name]), f"{name} imports deepspeed"
