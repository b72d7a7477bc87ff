"""The package's shape, read from its import statements: no cycles, the simulator and the
gateway apart, cache management fed by routing without reaching back into it, and
mitmproxy only in the glue (the routing addon, the engine-faults addon and the LLM
content view, which subclasses mitmproxy's ``contentviews.View``)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "addon" / "kvgate"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = ("kvgate",) + path.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """kvgate modules ``name`` imports at run time (``if TYPE_CHECKING`` blocks included)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1]) if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod
                       for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] != "kvgate":
                continue
            while t not in MODULES:
                t = t.rsplit(".", 1)[0]
            # importing a module imports its packages too, except the importer's own
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if not name.startswith(dep + ".") and dep != name:
                    found.add(dep)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _reach(start: str, through_config: bool = True) -> set[str]:
    """Every module ``start`` loads. ``through_config=False`` stops at the config, which
    knows every policy by name (to check ``policy:`` and its knobs)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        here = todo.pop()
        if not through_config and here.startswith("kvgate.config") and here != start:
            continue
        for dep in GRAPH.get(here, ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_graph_is_read() -> None:
    assert "kvgate.policies.base" in GRAPH["kvgate.gateway"]
    assert "kvgate.config" in GRAPH["kvgate.fleet.cluster"]
    assert len(MODULES) > 40


def test_no_import_cycles() -> None:
    cycles = [m for m in GRAPH if m in _reach(m)]
    assert cycles == []


def test_the_simulator_and_the_gateway_do_not_import_each_other() -> None:
    for name in GRAPH:
        deps = GRAPH[name]
        if name.startswith("kvgate.sim"):
            # the simulated engines tokenize as vLLM does, with the same leaf module
            outside = {d for d in deps if not d.startswith("kvgate.sim")}
            assert outside <= {"kvgate", "kvgate.tokens", "kvgate.tokens.local"}, name
        else:
            assert not any(d.startswith("kvgate.sim") for d in deps), name
    assert GRAPH["kvgate.tokens.local"] <= {"kvgate", "kvgate.tokens"}


def test_cache_management_never_reaches_into_routing() -> None:
    routing = ("kvgate.policies", "kvgate.gateway", "kvgate.addon", "kvgate.engine_faults",
               "kvgate.request.routed",
               "kvgate.placement.lookup_cache", "kvgate.tokens.finder")
    for name in GRAPH:
        if name.startswith("kvgate.cache_management"):
            reached = _reach(name, through_config=False)
            assert not [d for d in reached if d.startswith(routing)], name


def test_policies_are_pure_of_clients_and_the_pipeline() -> None:
    banned = ("kvgate.clients", "kvgate.gateway", "kvgate.addon", "kvgate.engine_faults",
              "kvgate.cache_management", "kvgate.config")
    for name in GRAPH:
        if name.startswith("kvgate.policies"):
            assert not [d for d in _reach(name) if d.startswith(banned)], name


def test_only_the_glue_imports_mitmproxy() -> None:
    users = sorted(name for name, path in MODULES.items()
                   if "mitmproxy" in {n.split(".")[0] for n in _third_party(path)})
    assert users == ["kvgate.addon", "kvgate.contentview", "kvgate.engine_faults"]


def _third_party(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out
