"""Accuracy-aware adapter generation (VaLoRA §4): as few adapters as possible, each task still at its target.

Next-fit greedy over the tasks in order: the open group's adapter is trained further on the union of its tasks and
the candidate (warm start, so the group's knowledge is kept while the new task is learnt); if any task of the
enlarged group falls below its accuracy target, the fusion is rolled back (the group keeps its previous adapter and
the candidate opens a new group, starting from its own dedicated adapter). Training and evaluation are passed in,
so the policy is tested with stubs and run for real by ``bench/valora_adapters.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from edgecloud.errors import UserError


@dataclass
class Group:
    tasks: list[str]
    adapter: str  # name (directory) of the adapter serving every task in ``tasks``
    accuracy: dict[str, float] = field(default_factory=dict)


def fuse(tasks: list[str], targets: dict[str, float], dedicated: dict[str, tuple[str, float]],
         train_union: Callable[[list[str], str, str], str], evaluate: Callable[[str, str], float],
         max_group: int = 8, stop: Callable[[str], bool] = lambda name: False,
         log=print) -> tuple[list[Group], list[dict]]:
    """Greedy fusion. ``dedicated[t] = (adapter, accuracy)``; ``train_union(tasks, init_adapter, name)`` returns
    the new adapter's name; ``evaluate(adapter, task)`` its held-out accuracy. Returns the groups and a log of every
    attempt (accepted or rolled back, with every task's accuracy). A group closes at ``max_group`` tasks (each
    attempt re-evaluates every task of the group, so the cost of a check grows with the group). Once ``stop(name)``
    is true for an attempt's adapter name, it does not start (recorded as not attempted): the task keeps its own
    adapter."""
    missing = [t for t in tasks if t not in targets or t not in dedicated]
    if missing:
        raise UserError(f"fusion: task {missing[0]!r} has no target or no dedicated adapter")
    groups: list[Group] = []
    attempts: list[dict] = []
    for t in tasks:
        if groups and len(groups[-1].tasks) < max_group and stop("+".join(groups[-1].tasks + [t])):
            attempts.append({"tasks": groups[-1].tasks + [t], "accepted": False, "not_attempted": "time budget"})
        elif groups and len(groups[-1].tasks) < max_group:
            g = groups[-1]
            union = g.tasks + [t]
            name = "+".join(union)
            cand = train_union(union, g.adapter, name)
            acc = {u: evaluate(cand, u) for u in union}
            ok = all(acc[u] >= targets[u] for u in union)
            attempts.append({"tasks": union, "adapter": name, "accuracy": acc, "accepted": ok,
                             "below_target": [u for u in union if acc[u] < targets[u]]})
            log(f"fuse {name}: " + ", ".join(f"{u} {acc[u]:.2f}/{targets[u]:.2f}" for u in union)
                + (" -> accepted" if ok else " -> rolled back"))
            if ok:
                g.tasks, g.adapter, g.accuracy = union, cand, acc
                continue
        ad, a = dedicated[t]
        groups.append(Group([t], ad, {t: a}))
    return groups, attempts
