"""The house rules, read from every module's imports (the AST, not a grep):

- each part of ``worker/`` imports only the parts below it (cli > demo > local > serve >
  process > engine > adapters > model > kernels) and the producer; the producer imports
  nothing of ``worker/`` or ``kernels/``; ``kernels/`` imports only itself; nothing imports
  the CLI;
- the queue worker's side (``serve``, ``local``, the client side of ``process``), the CLI,
  the producer and the torch-free modules the worker reads never import torch when they are
  imported (following every module-level import, packages' ``__init__`` included);
- no import cycle, counting imports inside functions, under ``TYPE_CHECKING`` and through
  ``importlib``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"producer": ROOT / "producer", "worker": ROOT / "worker", "kernels": ROOT / "kernels"}

#: Parts of ``worker/``, top to bottom: each may import only the parts after it.
WORKER_ORDER = ("cli", "demo", "local", "serve", "process", "engine", "adapters", "model")
HEAVY = ("torch", "transformers", "triton", "safetensors", "peft")
#: What must import no torch: the queue worker's side, the CLI, the producer (whole
#: trees), and the modules of the engine's side that the queue worker reads.
LIGHT_TREES = (
    "lorafleet.producer",
    "lorafleet.worker.cli",
    "lorafleet.worker.serve",
    "lorafleet.worker.local",
)
LIGHT_MODULES = (
    "lorafleet.worker",
    "lorafleet.worker.process.link",
    "lorafleet.worker.process.async_engine",
    "lorafleet.worker.engine.config",
    "lorafleet.worker.engine.outputs",
    "lorafleet.worker.model.catalog",
    "lorafleet.worker.demo.demo_assets",
    "lorafleet.worker.demo.chat_demo",
)


@dataclass
class Module:
    name: str
    path: Path
    imports: set[str] = field(default_factory=set)  # every lorafleet import, anywhere
    eager: set[str] = field(default_factory=set)  # lorafleet imports run at import time
    heavy: set[str] = field(default_factory=set)  # heavy packages imported at import time

    @property
    def part(self) -> str:
        """``producer``, ``kernels``, a part of ``worker/``, or ``worker`` (its __init__)."""
        parts = self.name.split(".")
        if parts[1] != "worker" or len(parts) == 2:
            return parts[1]
        return parts[2]


def _modules() -> dict[str, Module]:
    found = {}
    for top, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join(["lorafleet", top, *parts])
            found[name] = Module(name, path)
    for module in found.values():
        _read(module, found)
    return found


def _resolve(name: str, known: dict[str, Module]) -> str | None:
    """The module ``name`` imports (a module of the tree, or the package it names)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _read(module: Module, known: dict[str, Module]) -> None:
    tree = ast.parse(module.path.read_text(), str(module.path))
    eager_nodes = _eager_nodes(tree)
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # ``from package import submodule`` imports the submodule; a name, the package.
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                for a in node.names
            ]
        elif isinstance(node, ast.Call) and _is_import_module(node):
            targets = [node.args[0].value]
        for target in targets:
            top = target.split(".")[0]
            if top == "lorafleet":
                resolved = _resolve(target, known)
                if resolved and resolved != module.name:
                    module.imports.add(resolved)
                    if id(node) in eager_nodes:
                        module.eager.add(resolved)
            elif top in HEAVY and id(node) in eager_nodes:
                module.heavy.add(top)
    if module.name == "lorafleet.worker":  # the facade's lazy names
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in known:
                module.imports.add(node.value)


def _is_import_module(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    arg = node.args[0] if node.args else None
    return name == "import_module" and isinstance(arg, ast.Constant) and isinstance(arg.value, str)


def _eager_nodes(tree: ast.Module) -> set[int]:
    """Import statements that run when the module is imported: at module level or in
    module-level blocks, not in functions and not under ``if TYPE_CHECKING``."""
    eager: set[int] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for stmt in statements:
            if isinstance(stmt, ast.Import | ast.ImportFrom):
                eager.add(id(stmt))
            elif isinstance(stmt, ast.If):
                if not (isinstance(stmt.test, ast.Name) and stmt.test.id == "TYPE_CHECKING"):
                    visit(stmt.body)
                visit(stmt.orelse)
            elif isinstance(stmt, ast.Try):
                for block in (stmt.body, *(h.body for h in stmt.handlers), stmt.orelse):
                    visit(block)
            elif isinstance(stmt, ast.ClassDef):
                visit(stmt.body)

    visit(tree.body)
    return eager


MODULES = _modules()


def _allowed(importer: Module, imported: Module) -> bool:
    a, b = importer.part, imported.part
    if b == "cli":
        return a == "cli"
    if a == b or (b == "producer" and a != "kernels"):
        return True
    if a in ("producer", "kernels"):
        return False
    if a == "worker":  # the facade names what it exports, lazily
        return True
    rank = {part: i for i, part in enumerate(WORKER_ORDER)}
    rank["kernels"] = len(WORKER_ORDER)
    rank["worker"] = -1
    return rank.get(b, -1) > rank[a]


def arrows_against_the_rules(modules: dict[str, Module]) -> list[str]:
    return sorted(
        f"{m.name} imports {n}"
        for m in modules.values()
        for n in m.imports
        if not _allowed(m, modules[n])
    )


def _loaded_with(name: str, modules: dict[str, Module]) -> set[str]:
    """Every module importing ``name`` runs at once (its packages' ``__init__`` too)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parts = current.split(".")
        todo += [
            ".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) in modules
        ]
        todo += modules[current].eager
    return seen


def heavy_imports(modules: dict[str, Module]) -> list[str]:
    light = [
        n
        for n in modules
        if n in LIGHT_MODULES or any(n == t or n.startswith(t + ".") for t in LIGHT_TREES)
    ]
    found = []
    for name in light:
        for loaded in sorted(_loaded_with(name, modules)):
            for heavy in sorted(modules[loaded].heavy):
                found.append(f"importing {name} imports {heavy} (in {loaded})")
    return found


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(modules[v].imports):
            if w not in index:
                connect(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            connect(v)
    return found


def test_imports_point_down_the_layers():
    assert arrows_against_the_rules(MODULES) == []


def test_the_worker_side_imports_no_torch():
    assert heavy_imports(MODULES) == []


def test_no_import_cycles():
    assert cycles(MODULES) == []


@pytest.mark.parametrize(
    "importer, imported",
    [
        ("lorafleet.worker.engine.llm_engine", "lorafleet.worker.serve.jobs"),  # upward
        ("lorafleet.producer.client", "lorafleet.worker.serve.settings"),
        ("lorafleet.worker.serve.jobs", "lorafleet.worker.cli.generate"),
        ("lorafleet.kernels.meta", "lorafleet.producer.types"),
    ],
)
def test_an_arrow_against_the_rules_is_caught(importer, imported):
    """The check itself: adding one forbidden import makes it fail."""
    modules = {n: Module(m.name, m.path, set(m.imports)) for n, m in MODULES.items()}
    modules[importer].imports.add(imported)
    assert arrows_against_the_rules(modules) == [f"{importer} imports {imported}"]


def test_a_cycle_is_caught_even_through_a_lazy_import():
    modules = {n: Module(m.name, m.path, set(m.imports)) for n, m in MODULES.items()}
    modules["lorafleet.worker.engine.sequence"].imports.add("lorafleet.worker.engine.llm_engine")
    assert any("lorafleet.worker.engine.sequence" in c for c in cycles(modules))


def test_torch_at_import_time_is_caught():
    modules = {
        n: Module(m.name, m.path, set(m.imports), set(m.eager), set(m.heavy))
        for n, m in MODULES.items()
    }
    modules["lorafleet.worker.serve.validation"].eager.add("lorafleet.worker.engine.sampler")
    assert any(
        line.startswith("importing lorafleet.worker.serve") for line in heavy_imports(modules)
    )
