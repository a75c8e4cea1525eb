"""Online serving loop over the batched engine with per-request adapters, and the switching policies compared.

All policies run in the same loop, same engine, same adapters; they differ only in (a) which queued requests they
admit, (b) the LoRA mode (which adapter, if any, is merged) and (c) the operator choice:

- ``sequential``: one adapter at a time (merged), no cross-adapter batching.
- ``slora``: always unmerged, gather kernel (BGMV-like).
- ``punica``: always unmerged, segmented kernel with fixed tiling (SGMV-like).
- ``dlora``: merge the dominant adapter when its queue share ≥ ``merge_at`` and then serve only it; unmerge when
  other adapters' share ≥ ``unmerge_at`` or one starves (waits > ``starve_s``).
- ``valora``: never holds a request back (every adapter is served in every mode) and, before each step, picks the
  mode with the lowest predicted side-path cost for the rows about to run: unmerged (one side path per layer
  while any row has an adapter), merged hot adapter h (free once every row is h) or mixture (h merged, the others
  corrected by x(ΔW_i − ΔW_h): ``mixture_cost`` side paths until the last non-h row ends), a switch costing
  ``switch_cost``. Only an adapter with share ≥ ``merge_at`` of queued + running requests is a merge candidate;
  ATMM dispatch table.
Because the mixture correction is exact, switching mid-flight never changes a running sequence's tokens.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from edgecloud.llm.batch import Batch
from edgecloud.lora.atmm import Dispatch

POLICIES = ("sequential", "slora", "punica", "dlora", "valora")


@dataclass
class Request:
    id: int
    adapter: str
    prompt: list[int]
    arrival: float
    max_new_tokens: int = 8
    ignore_eos: bool = False  # fixed output length (as serving benchmarks do): the load is the same for every policy
    tokens: list[int] = field(default_factory=list)
    ttft: float = 0.0
    latency: float = 0.0


@dataclass
class Policy:
    name: str
    merge_at: float = 0.5
    unmerge_at: float = 0.25
    starve_s: float = 2.0
    max_batch: int = 16
    # valora's cost model, in units of one step's unmerged side path. Defaults measured under `timed` (16 rows at
    # s≈0.8, rank 4, SmolLM2-135M: no side path 164 ms, unmerged 181, mixture's one rank-2r path 177, merge or
    # unmerge ~11 ms); the bench re-measures them at start-up (bench.mode_step_costs)
    mixture_cost: float = 0.74
    switch_cost: float = 0.66


def _hot(reqs) -> tuple[str | None, float]:
    c = Counter(r.adapter for r in reqs)
    if not c:
        return None, 0.0
    a, n = c.most_common(1)[0]
    return a, n / sum(c.values())


def serve(engine, lora, requests: list[Request], policy: Policy, table: dict | None = None,
          clients: int | None = None) -> dict:
    """Run ``requests`` (arrival offsets in seconds) in real time; returns per-request results and switch costs.

    ``clients``: a closed loop instead (saturation): the arrival offsets are ignored, ``clients`` requests arrive
    at 0 and each completion releases the next request in list order at that moment, so the engine never waits for
    work and throughput = tokens / wall time is the policy's capacity on this request mix."""
    fixed = {"slora": "gather/64", "punica": "segmented/0", "dlora": "segmented/0", "sequential": "segmented/0"}
    lora.dispatch = Dispatch(table) if policy.name == "valora" else Dispatch(fixed=fixed[policy.name])
    lora.merge(None)
    lora.switch_s = []
    held: list[Request] = []
    if clients is not None:
        if clients < 1:
            raise ValueError(f"clients must be >= 1, got {clients}")
        held = list(requests[clients:])
        requests = requests[:clients]
        for r in requests:
            r.arrival = 0.0
    pending = sorted(requests, key=lambda r: r.arrival)
    queue: list[Request] = []
    running: dict[int, Request] = {}
    batch = Batch(engine)
    t0 = time.perf_counter()
    done: list[Request] = []
    modes = Counter({"unmerged": 0, "mixture": 0, "merged": 0})  # decode steps run in each mode
    while pending or queue or running:
        now = time.perf_counter() - t0
        while pending and pending[0].arrival <= now:
            queue.append(pending.pop(0))
        if not queue and not running:
            time.sleep(max(0.0, pending[0].arrival - now))
            continue
        admit = _admit(policy, lora, queue, running, now)
        if admit:
            for r in admit:
                queue.remove(r)
                lora.seq_adapter[r.id] = r.adapter
                running[r.id] = r
            batch.add({r.id: r.prompt for r in admit}, max(r.max_new_tokens for r in admit))
            t = time.perf_counter() - t0
            for r in admit:
                r.ttft = t - r.arrival
        chosen, fin = {}, []
        for s in batch.active:
            tok = s.choose()
            r = running[s.id]
            r.tokens.append(tok)
            if (tok in engine.eos_ids and not r.ignore_eos) or len(r.tokens) >= r.max_new_tokens:
                fin.append(s.id)
            else:
                chosen[s.id] = tok
        batch.remove(*fin)
        t = time.perf_counter() - t0
        for i in fin:
            r = running.pop(i)
            r.latency = t - r.arrival
            lora.seq_adapter.pop(i, None)
            done.append(r)
            if held:  # closed loop: this client sends its next request now
                nxt = held.pop(0)
                nxt.arrival = t
                pending.append(nxt)
        if running:
            m = lora.merged
            mode = "unmerged" if m is None else "merged" if all(r.adapter == m for r in running.values()) else "mixture"
            modes[mode] += 1
            batch.step(chosen)
    lora.merge(None)
    return {"wall_s": time.perf_counter() - t0, "requests": done, "switch_s": list(lora.switch_s),
            "calls": dict(lora.calls), "mode_steps": dict(modes)}


def _admit(policy: Policy, lora, queue, running, now) -> list[Request]:
    room = policy.max_batch - len(running)
    if room <= 0 or not queue:
        if policy.name == "valora":
            _valora_mode(policy, lora, queue, running)
        return []
    if policy.name in ("slora", "punica"):
        return queue[:room]
    if policy.name == "sequential":
        if not running:
            lora.merge(queue[0].adapter)
        cur = lora.merged
        return [r for r in queue if r.adapter == cur][:room]
    if policy.name == "dlora":
        if lora.merged is None:
            hot, share = _hot(queue + list(running.values()))
            if share >= policy.merge_at and all(r.adapter == hot for r in running.values()):
                lora.merge(hot)
            else:
                return queue[:room]
        m = lora.merged
        others = [r for r in queue if r.adapter != m]
        starving = any(now - r.arrival > policy.starve_s for r in others)
        if others and (len(others) / len(queue) >= policy.unmerge_at or starving):
            if not running:  # drain, then unmerge (merged mode cannot serve other adapters)
                lora.merge(None)
                return queue[:room]
            return []
        return [r for r in queue if r.adapter == m][:room]
    _valora_mode(policy, lora, queue, running)
    return queue[:room]


def _left(r) -> int:
    """Decode steps a request still needs (at most): a server job counts its whole budget."""
    return getattr(r, "max_new_tokens", getattr(r, "max_tokens", 1)) - len(getattr(r, "tokens", ()))


def mode_costs(rows, merged: str | None, candidate: str | None, policy: Policy) -> dict:
    """Predicted side-path cost of serving ``rows`` to the end unmerged, or with ``candidate`` merged (mixture until
    its last other row ends, then free), each plus the switch from the current mode."""
    def span(keep):
        return max((_left(r) for r in rows if keep(r)), default=0)

    out = {None: span(lambda r: r.adapter is not None) + (policy.switch_cost if merged is not None else 0.0)}
    if candidate is not None:
        out[candidate] = (policy.mixture_cost * span(lambda r: r.adapter != candidate)
                          + (policy.switch_cost if merged != candidate else 0.0))
    if merged is not None and merged != candidate:
        out[merged] = policy.mixture_cost * span(lambda r: r.adapter != merged)
    return out


def _valora_mode(policy, lora, queue, running):
    """Switch to the cheapest mode for the rows that will run next (running + the queue's next admissions)."""
    rows = list(running.values()) + list(queue[:max(0, policy.max_batch - len(running))])
    hot, share = _hot(list(queue) + list(running.values()))
    cand = hot if hot is not None and share >= policy.merge_at else None
    costs = mode_costs(rows, lora.merged, cand, policy)
    best = min(costs, key=lambda m: (costs[m], m != lora.merged))  # ties keep the current mode
    if best != lora.merged:
        lora.merge(best)


def summarize(res: dict, slo_s: float) -> dict:
    import numpy as np

    rs = res["requests"]
    lat = np.array([r.latency for r in rs])
    ttft = np.array([r.ttft for r in rs])
    toks = sum(len(r.tokens) for r in rs)
    return {"throughput_tok_s": toks / res["wall_s"], "requests": len(rs), "mean_latency_s": float(lat.mean()),
            "p50_latency_s": float(np.percentile(lat, 50)), "p99_latency_s": float(np.percentile(lat, 99)),
            "mean_ttft_s": float(ttft.mean()), "slo_attainment": float((lat <= slo_s).mean()),
            "switches": len(res["switch_s"]), "switch_ms_mean": 1e3 * float(np.mean(res["switch_s"] or [0.0])),
            "mode_steps": res.get("mode_steps", {})}
