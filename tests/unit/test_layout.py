"""The package's layering, read from the source: no import cycles, no imports inside functions
but the documented ones, plain-torch layers that import neither Lightning nor the stages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SRC = REPO / "src"
PACKAGE = SRC / "selfsup"

#: Imports inside functions that are allowed: optional extras, imported only when a user asks for
#: them, and three named exceptions. Each such line must say why in a comment on it or above it.
OPTIONAL_EXTRAS = {"timm", "litdata", "wandb"}
EXCEPTIONS = {
    # `from selfsup.data import ImageDataModule` keeps working without Lightning in selfsup.data.
    ("selfsup.data", "selfsup.data.datamodule"),
    # torch._dynamo takes a second to import; only views.compile needs it.
    ("selfsup.data.views", "torch._dynamo.exc"),
    # The streamed dataset needs LitData (the stream extra); in-memory data must not.
    ("selfsup.data.datamodule", "selfsup.data.litdata.dataset"),
}

#: Layers in plain torch: none of them may import Lightning or the stage modules, directly or
#: through the selfsup modules they import.
PLAIN = [
    "selfsup.config",
    "selfsup.console",
    "selfsup.files",
    "selfsup.distributed",
    "selfsup.metrics",
    "selfsup.protocols",
    "selfsup.losses.ntxent",
    "selfsup.losses.infonce",
    "selfsup.models.backbones",
    "selfsup.models.heads",
    "selfsup.models.weights",
    "selfsup.optim.schedules",
    "selfsup.optim.lars",
    "selfsup.optim.optimizer",
    "selfsup.evaluation.knn",
    "selfsup.evaluation.probe_search",
    "selfsup.evaluation.verdict",
    "selfsup.data.decode",
    "selfsup.data.folders",
    "selfsup.data.splits",
    "selfsup.data.cache",
    "selfsup.data.sources",
    "selfsup.data.report",
    "selfsup.data.crops",
    "selfsup.data.views",
    "selfsup.data.patches",
    "selfsup.data.loaders",
    "selfsup.data.litdata.format",
    "selfsup.data.litdata.samples",
    "selfsup.data.litdata.write",
    "selfsup.data.litdata.dataset",
]
FORBIDDEN = ("lightning", "pytorch_lightning", "selfsup.methods", "selfsup.cli", "selfsup.pipeline", "selfsup.run")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The absolute names an import statement of ``module`` brings in (modules where they are)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
    # `from selfsup.data import views` imports a module; `from x import name` the module x.
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def top_level_imports(module: str) -> set[str]:
    """Names imported when the module is imported: its top-level statements, with
    ``if TYPE_CHECKING`` blocks left out (they never run)."""
    tree = ast.parse(MODULES[module].read_text())
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.update(resolve(module, node))
            elif isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + [s for h in node.handlers for s in h.body] + node.orelse + node.finalbody)

    visit(tree.body)
    return out


def with_parents(name: str) -> list[str]:
    """A module and the packages above it, whose ``__init__`` runs first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_closure(module: str) -> set[str]:
    """Every name imported, directly or through selfsup modules, when ``module`` is imported
    (the packages above the module itself left out: they are the package's front door)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        for name in top_level_imports(m):
            for part in with_parents(name):
                if part in seen:
                    continue
                seen.add(part)
                if part in MODULES and part != module:
                    todo.append(part)
    return seen


def test_every_module_is_listed() -> None:
    assert "selfsup.data.datamodule" in MODULES and "selfsup.evaluation.knn" in MODULES
    assert set(PLAIN) <= set(MODULES), set(PLAIN) - set(MODULES)


def test_no_import_cycles() -> None:
    # A module's own packages are already being imported when it runs: not an edge.
    graph = {
        m: {n for name in top_level_imports(m) for n in with_parents(name) if n in MODULES and n not in with_parents(m)}
        for m in MODULES
    }
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n) :] + [n] if n in path else [m, n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])


def test_imports_inside_functions_are_optional_extras_with_a_reason() -> None:
    found = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(node):
                if not isinstance(sub, (ast.Import, ast.ImportFrom)):
                    continue
                for name in resolve(module, sub):
                    allowed = name.split(".")[0] in OPTIONAL_EXTRAS or (module, name) in EXCEPTIONS
                    reason = "#" in lines[sub.lineno - 1] or lines[sub.lineno - 2].strip().startswith("#")
                    found.append((module, name))
                    assert allowed, f"{module}:{sub.lineno} imports {name} inside a function"
                    assert reason, (
                        f"{module}:{sub.lineno} imports {name} inside a function without a comment saying why"
                    )
    assert ("selfsup.models.backbones", "timm") in found  # the walk sees function bodies


@pytest.mark.parametrize("module", PLAIN)
def test_plain_torch_layers_import_no_lightning_and_no_stages(module: str) -> None:
    bad = sorted(n for n in imported_closure(module) if n.startswith(FORBIDDEN))
    assert not bad, f"{module} imports {bad}"


def test_importing_the_views_loads_no_lightning_at_run_time() -> None:
    """The static check above, confirmed in a fresh interpreter for the modules a decoding or
    loader worker imports (the package's own __init__ files included)."""
    code = (
        "import sys, selfsup.data.views, selfsup.data.decode, selfsup.data.cache, selfsup.data.litdata.samples; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
