"""deploy/'s import graph, read from the source with `ast`: one way, layer by layer, no cycle; and
no cycle in serving/ and benchmarks/ either.

Every import counts, wherever it is written: at the top, inside a function, or under
`if TYPE_CHECKING:` (a cycle there still says one module holds two layers). Importing
`deploy.x.y` also runs the packages `deploy` and `deploy.x`, so those are edges too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from deploy.paths import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"

# Bottom to top. A module imports only modules of its own layer or below; a new module must be
# placed here (the test fails until it is), which is the moment to decide where it belongs.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"deploy.errors", "deploy.paths", "deploy.typed_config", "deploy.host", "deploy.health",
                    "deploy.venv_probe"}),
    ("typed profile, and tools that need no profile", {
        "deploy.profile", "deploy.child", "deploy.supervise", "deploy.run_state", "deploy.tiny.model", "deploy.tiny.lora",
        "deploy.ray.cluster"}),
    ("readers of a profile", {"deploy.adapters", "deploy.ray.preflight"}),
    ("engines", {
        "deploy.engines.base", "deploy.engines.vllm_check", "deploy.engines.vllm", "deploy.engines.sglang_check",
        "deploy.engines.sglang", "deploy.engines.sglang_probe", "deploy.engines.registry"}),
    ("loader, render, plan, launch", {
        "deploy.loader", "deploy.render", "deploy.memory_plan", "deploy.layout", "deploy.launch",
        "deploy.forecast.layouts", "deploy.forecast.aic", "deploy.forecast.probe", "deploy.forecast.choose",
        "deploy.forecast.run", "deploy.forecast.report"}),
    ("chart generator", {"deploy.chart"}),
    ("command line", {"deploy.cli", "deploy.ray.cli", "deploy.__main__"}),
]
PACKAGES = {"deploy", "deploy.engines", "deploy.ray", "deploy.tiny", "deploy.forecast"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules and packages of its own top package `name` (at path) imports, anywhere in its source."""
    top = name.split(".")[0]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from deploy.engines import vllm` imports the module deploy.engines.vllm.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target == top or target.startswith(f"{top}."):
                parts = target.split(".")
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    found.discard(name)
    return found & known


def graph(root: Path) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports(path, name, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (each reported once, from where it was entered)."""
    found: list[list[str]] = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_walker_sees_every_kind_of_import(tmp_path: Path) -> None:
    root = tmp_path / "deploy"
    (root / "sub").mkdir(parents=True)
    for name in ("__init__.py", "a.py", "b.py", "c.py", "d.py", "sub/__init__.py", "sub/e.py"):
        (root / name).write_text("")
    (root / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from deploy.b import X\n"
        "def f():\n    import deploy.c\nfrom deploy.sub import e\nfrom . import d\nimport os\n")
    assert graph(root)["deploy.a"] == {"deploy", "deploy.b", "deploy.c", "deploy.d", "deploy.sub", "deploy.sub.e"}


@pytest.mark.parametrize(("package", "an_edge"), [
    ("deploy", ("deploy.loader", "deploy.engines.registry")),
    ("serving", ("serving.routing", "serving.ejection")),
    ("benchmarks", ("benchmarks.routing", "benchmarks.scale_out")),
])
def test_no_import_cycle(package: str, an_edge: tuple[str, str]) -> None:
    """The proxy and the benchmarks too: a cycle (TYPE_CHECKING imports count) says a module holds two layers."""
    edges = graph(REPO_ROOT / package)
    importer, imported = an_edge
    assert imported in edges[importer]  # the walker reads the real tree
    assert cycles(edges) == []


def test_every_module_has_a_layer_and_imports_only_downwards() -> None:
    layer_of = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}
    edges = graph(DEPLOY)
    assert set(edges) - PACKAGES == set(layer_of), "place each deploy module in LAYERS"
    upward = [
        f"{name} ({LAYERS[layer_of[name]][0]}) imports {target} ({LAYERS[layer_of[target]][0]})"
        for name, targets in sorted(edges.items()) if name in layer_of
        for target in sorted(targets) if target in layer_of and layer_of[target] > layer_of[name]
    ]
    assert upward == []


def test_packages_only_name_their_modules() -> None:
    """A package's __init__ runs before any of its modules: importing nothing keeps it out of cycles."""
    edges = graph(DEPLOY)
    assert {package: edges[package] for package in PACKAGES} == {package: set() for package in PACKAGES}


def test_the_typed_profile_imports_no_engine_and_no_loader() -> None:
    assert graph(DEPLOY)["deploy.profile"] == {"deploy", "deploy.paths", "deploy.typed_config"}
