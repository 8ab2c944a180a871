"""The import rules of ARCHITECTURE.md, as data, and a checker over the real import graph.

``import_graph`` reads every module of the four packages with ``ast`` (nothing is
imported, so the check is fast and cannot be fooled by import side effects) and
records each ``import``/``from ... import`` anywhere in the file: at the top, inside
a function (a lazy import is still a dependency) or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("llmserve", "router", "loadtest", "fallback")
ROOT = Path(__file__).resolve().parent.parent

# The composition root: the only modules of llmserve that may wire the router (and the tools) in.
COMPOSITION_ROOT = ("llmserve.cli", "llmserve.server")
# What a client of the stack (the load tests, the distillers) may use of the router: leaves with no app in them.
# (router.access: the gateway benchmark times the key ring and the buckets themselves.)
ROUTER_LEAVES_FOR_TOOLS = ("router.relay.sse", "router.predict.runtimes", "router.predict.errors",
                           "router.traffic", "router.store", "router.observe.engine_samples", "router.access")
# Inside the router, each layer may import only the layers listed (besides itself and llmserve).
ROUTER_CORE = ("router.errors", "router.traffic", "router.relay", "router.admission", "router.predict",
               "router.observe", "router.store", "router.access", "router.jobs", "router.batches")
ROUTER_LAYERS: dict[str, tuple[str, ...]] = {
    "router.app": ("router",),
    "router.api": ("router.gateway", "router.control", "router.state", *ROUTER_CORE),
    "router.gateway": ("router.state", *ROUTER_CORE),
    "router.state": ("router.control", *ROUTER_CORE),
    "router.control": ROUTER_CORE,
    "router.errors": ("router.store.base", "router.predict.errors", "router.traffic.split", "router.jobs.errors"),
    # the bottom: the store knows its records, not who uses them (router.jobs maps its jobs onto it)
    "router.store": (),
}
for _core in ROUTER_CORE[1:]:
    ROUTER_LAYERS.setdefault(_core, ROUTER_CORE)


def _within(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Violation:
    importer: str
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.importer} imports {self.imported}: {self.rule}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from a.b import c`` counts ``a.b.c`` when that is a module)."""
    files = {module_name(p, root): p for package in PACKAGES for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            for target in targets:
                if target.split(".")[0] not in PACKAGES:
                    continue
                while target and target not in files:  # ``from pkg.mod import name``: the module is pkg.mod
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        # a package's __init__ is imported with any of its modules; it is not a dependency of its own
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    return graph


def rule_for(importer: str, imported: str) -> str | None:
    """The rule an edge breaks, or None when it is allowed."""
    top, target_top = importer.split(".")[0], imported.split(".")[0]
    if top == "llmserve":
        if _within(importer, COMPOSITION_ROOT):
            return None
        if target_top != "llmserve":
            return "llmserve imports nothing outside itself (except its composition root: cli, server)"
        if _within(imported, COMPOSITION_ROOT):
            return "only the command line may import the composition root"
        return None
    if top == "router":
        if target_top in ("loadtest", "fallback"):
            return "the router never imports the tools built on it"
        if target_top == "llmserve":
            return "the router may not import llmserve's composition root" if _within(
                imported, COMPOSITION_ROOT) else None
        for layer, allowed in ROUTER_LAYERS.items():
            if _within(importer, (layer,)):
                if _within(imported, (layer,)) or _within(imported, allowed):
                    return None
                return f"{layer} may import only {', '.join(allowed)}"
        return None
    # loadtest and fallback: clients of the stack
    if target_top == "router" and not _within(imported, ROUTER_LEAVES_FOR_TOOLS):
        return f"loadtest and fallback use the router only through llmserve.server and {ROUTER_LEAVES_FOR_TOOLS}"
    return None


def violations(graph: Mapping[str, set[str]]) -> list[Violation]:
    found = []
    for importer, imported in sorted((a, b) for a, edges in graph.items() for b in edges):
        rule = rule_for(importer, imported)
        if rule is not None:
            found.append(Violation(importer, imported, rule))
    return found


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups
