"""Resolve the order in which plugins run from their ``run_after`` / ``run_before`` declarations.

pluggy alone offers only last-registered-first plus ``tryfirst``/``trylast``; litplug needs "EWC after
the replay buffer" between named plugins, so the core sorts them itself (Kahn's algorithm, ties
broken by the order the user configured) and registers them with pluggy in that order.
"""

from __future__ import annotations

from collections.abc import Sequence

from litplug.core.errors import PluginSetupError
from litplug.core.plugin import Plugin


def check_unique_names(plugins: Sequence[Plugin]) -> None:
    seen: dict[str, Plugin] = {}
    for plugin in plugins:
        if plugin.name in seen:
            raise PluginSetupError(
                f"plugin '{plugin.name}' is configured twice ({seen[plugin.name]!r} and {plugin!r}); "
                "each plugin may appear once"
            )
        seen[plugin.name] = plugin


def check_conflicts(plugins: Sequence[Plugin]) -> None:
    names = {p.name for p in plugins}
    for plugin in plugins:
        for other in plugin.conflicts_with:
            if other in names:
                reason = plugin.conflict_reasons.get(other)
                because = f" ({reason})" if reason else ""
                raise PluginSetupError(
                    f"plugin '{plugin.name}' conflicts with plugin '{other}'{because}: configure only one of them"
                )


def _edges(plugins: Sequence[Plugin]) -> dict[str, set[str]]:
    """Map each plugin name to the names that must run after it (only configured plugins count)."""
    names = {p.name for p in plugins}
    after: dict[str, set[str]] = {p.name: set() for p in plugins}
    for plugin in plugins:
        for earlier in plugin.run_after:
            if earlier in names:
                after[earlier].add(plugin.name)
        for later in plugin.run_before:
            if later in names:
                after[plugin.name].add(later)
    return after


def _find_cycle(after: dict[str, set[str]], remaining: set[str]) -> list[str]:
    """Return one cycle among ``remaining`` as a list of names, first name repeated at the end.

    Every node left over by Kahn's algorithm has a left-over predecessor, so walking predecessors
    must revisit a node; the walk, reversed, is a cycle in "runs before" direction.
    """
    before = {n: {m for m in remaining if n in after[m]} for n in remaining}
    node = min(remaining)
    walk: list[str] = []
    while node not in walk:
        walk.append(node)
        node = min(before[node])
    cycle = walk[walk.index(node) :]
    cycle.reverse()
    start = cycle.index(min(cycle))  # canonical rotation: the message is stable
    cycle = cycle[start:] + cycle[:start]
    return cycle + [cycle[0]]


def resolve_order(plugins: Sequence[Plugin]) -> list[Plugin]:
    """Sort plugins so every ``run_after``/``run_before`` holds; stable w.r.t. the configured order."""
    check_unique_names(plugins)
    check_conflicts(plugins)
    after = _edges(plugins)
    position = {p.name: i for i, p in enumerate(plugins)}
    by_name = {p.name: p for p in plugins}
    indegree = {name: 0 for name in after}
    for targets in after.values():
        for target in targets:
            indegree[target] += 1
    ready = sorted((n for n, d in indegree.items() if d == 0), key=position.__getitem__)
    ordered: list[str] = []
    while ready:
        name = ready.pop(0)
        ordered.append(name)
        for target in sorted(after[name], key=position.__getitem__):
            indegree[target] -= 1
            if indegree[target] == 0:
                ready.append(target)
        ready.sort(key=position.__getitem__)
    if len(ordered) < len(plugins):
        cycle = _find_cycle(after, set(after) - set(ordered))
        raise PluginSetupError(
            "plugin order has a cycle: " + " -> ".join(cycle) + " (each arrow means 'must run before'; "
            "remove one of the run_after/run_before declarations)"
        )
    return [by_name[n] for n in ordered]
