"""VaLoRA adapters: train one peft adapter per task, measure base vs adapter on held-out splits, fuse tasks into as
few adapters as meet every task's target (next-fit greedy with rollback), and compare a task head with decoding
on the classification tasks -> docs/results/valora_adapters.{json,md,png}.

    nice -n 10 python bench/valora_adapters.py [--work DIR] [--steps 15] [--text-steps 10] [--fuse-steps 8]

Resumable: every finished adapter, evaluation and head is recorded in WORK/state.json (written atomically) and
training resumes from its last checkpoint, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edgecloud import atomic
from edgecloud.lora.tasks import CLASSES, TASKS, examples
from edgecloud.results import Result, check_out_dir

BASE = "smollm2-135m"


def wall(info: dict) -> float | None:
    """Training wall time, or None where a run resumed from a checkpoint written before checkpoints kept it."""
    return info["train_s"] if not info.get("resumed_at") or info.get("elapsed_in_checkpoints") else None


def past(deadline: str | None) -> bool:
    return deadline is not None and time.strftime("%H:%M", time.gmtime()) >= deadline


def main() -> None:
    from edgecloud.paths import cache_root

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=cache_root() / "lora" / "adapters")
    ap.add_argument("--steps", type=int, default=15, help="training steps of a generated-data task's adapter")
    ap.add_argument("--text-steps", type=int, default=10, help="steps for the real-text tasks (longer prompts)")
    ap.add_argument("--fuse-steps", type=int, default=8, help="warm-start steps of each fusion attempt")
    ap.add_argument("--margin", type=float, default=0.1, help="target = dedicated adapter accuracy - margin")
    ap.add_argument("--max-group", type=int, default=2, help="most tasks one fused adapter may serve")
    ap.add_argument("--deadline", default=None, help="UTC HH:MM after which no new fusion attempt starts "
                    "(attempts already trained are replayed from the state)")
    ap.add_argument("--head-examples", type=int, default=96, help="training examples of each task head")
    ap.add_argument("--fuse-tasks", default=None, help="comma-separated tasks to fuse, in order (default: all); "
                    "the others keep their own adapters")
    ap.add_argument("--state", default="state.json", help="this run's state file under --work")
    ap.add_argument("--read-state", default=None, help="another run's state file under --work, read (not written): "
                    "a fusion-only run beside the main one")
    ap.add_argument("--only-fusion", action="store_true", help="fuse --fuse-tasks, save state, write no report")
    ap.add_argument("--n-test", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results")
    a = ap.parse_args()
    check_out_dir(a.out)
    torch.set_num_threads(1)
    a.work.mkdir(parents=True, exist_ok=True)
    state_p = a.work / a.state
    st = {"acc": {}, "train": {}, "head": {}}
    for f in (a.work / a.read_state if a.read_state else None, state_p):
        if f is not None and f.exists():
            for k, v in json.loads(f.read_text()).items():
                st[k].update(v)

    def save():
        atomic.write_text(state_p, json.dumps(st, indent=1))

    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model
    from edgecloud.lora.adapters import load_adapter
    from edgecloud.lora.layer import LoRAModel
    from edgecloud.lora.train import TrainConfig, evaluate, train

    e = Engine(load_model(BASE), threads=1)
    lm = LoRAModel(e.model, BASE)

    def ensure_loaded(name):
        if name is not None and name not in lm.adapters:
            lm.add(load_adapter(a.work / name, e.model, BASE, name))

    def acc(name, task):
        key = f"{name or 'base'}/{task}"
        if key not in st["acc"]:
            ensure_loaded(name)
            t = time.perf_counter()
            with torch.inference_mode():
                st["acc"][key] = evaluate(e, lm, name, task, a.n_test, a.seed)
            print(f"eval {key}: {st['acc'][key]:.3f} ({time.perf_counter() - t:.0f}s)", flush=True)
            save()
        return st["acc"][key]

    def trained(tasks, name, steps, init=None):
        if name not in st["train"]:
            cfg = TrainConfig(tasks=tuple(tasks), steps=steps, lr=3e-3, checkpoint_every=5, seed=a.seed)
            print(f"train {name} ({steps} steps on {tasks})", flush=True)
            st["train"][name] = train(cfg, a.work / name, BASE, init=a.work / init if init else None,
                                      log=lambda s: print(f"  {name} {s}", flush=True))
            save()
        return name

    tasks = list(TASKS)
    fuse_tasks = a.fuse_tasks.split(",") if a.fuse_tasks else tasks
    for t in (fuse_tasks if a.only_fusion else tasks):
        acc(None, t)
    for t in (fuse_tasks if a.only_fusion else tasks):
        trained([t], t, a.text_steps if t in CLASSES else a.steps)
        acc(t, t)

    from edgecloud.lora.head import Head, compare, features, fit

    for t in ([] if a.only_fusion else CLASSES):
        if t not in st["head"]:
            ensure_loaded(t)
            tr = examples(t, "train", a.head_examples, a.seed)
            head = fit(features(e, lm, t, tr), [x.answer for x in tr], CLASSES[t]())
            head.save(a.work / t / "head.safetensors")
            st["head"][t] = compare(e, lm, t, Head.load(a.work / t / "head.safetensors"),
                                    examples(t, "test", a.n_test, a.seed))
            print(f"head {t}: {st['head'][t]}", flush=True)
            save()

    from edgecloud.lora.fusion import fuse

    dedicated = {t: (t, acc(t, t)) for t in (fuse_tasks if a.only_fusion else tasks)}
    targets = {t: round(max(0.0, dedicated[t][1] - a.margin), 4) for t in dedicated}
    groups, attempts = fuse(fuse_tasks, targets, dedicated,
                            lambda ts, init, name: trained(ts, name, a.fuse_steps, init), acc,
                            max_group=a.max_group,
                            stop=lambda name: name not in st["train"] and past(a.deadline))

    if a.only_fusion:
        return
    from edgecloud.lora.fusion import Group

    groups += [Group([t], t, {t: dedicated[t][1]}) for t in tasks if t not in fuse_tasks]
    rows = [{"task": t, "base": st["acc"][f"base/{t}"], "adapter": dedicated[t][1], "target": targets[t],
             "fused_adapter": g.adapter, "fused": g.accuracy[t],
             "steps": st["train"][t]["config"]["steps"], "train_s": wall(st["train"][t])}
            for g in groups for t in g.tasks]
    data = {"base_model": BASE, "tasks": rows, "adapters_before": len(tasks), "adapters_after": len(groups),
            "groups": [{"tasks": g.tasks, "adapter": g.adapter} for g in groups], "fusion_attempts": attempts,
            "head_vs_decode": st["head"], "n_test": a.n_test, "margin": a.margin, "max_group": a.max_group,
            "train": {k: {"steps": v["config"]["steps"], "tasks": v["config"]["tasks"], "train_s": wall(v),
                          "final_loss": v["final_loss"], "init": v["init"]} for k, v in st["train"].items()}}
    res = Result("valora_adapters", data, seed=a.seed)
    res.markdown += (f"Held-out exact match ({a.n_test} examples per task); target = own adapter's accuracy - "
                     f"{a.margin}; {len(tasks)} tasks -> {len(groups)} adapters.\n\n")
    res.table(rows, ["task", "base", "adapter", "target", "fused_adapter", "fused", "steps", "train_s"])
    res.markdown += "\nFusion attempts (next-fit greedy, warm start from the group's adapter, rollback):\n"
    res.table([{"attempt": "+".join(x["tasks"]),
                "result": x.get("not_attempted") and f"not attempted ({x['not_attempted']})"
                or ("accepted" if x["accepted"] else "rolled back"),
                "accuracy / target": ", ".join(f"{t} {v:.3f}/{targets[t]:.3f}"
                                               for t, v in x.get("accuracy", {}).items())}
               for x in attempts], ["attempt", "result", "accuracy / target"])
    res.markdown += "\nTask head (one forward pass) vs decoding the label, batch 1:\n"
    res.table([{"task": t, **v} for t, v in st["head"].items()],
              ["task", "head_accuracy", "decode_accuracy", "head_latency_ms", "decode_latency_ms", "n"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = range(len(rows))
    for j, (k, lab) in enumerate((("base", "base model"), ("adapter", "own adapter"), ("fused", "fused adapter"))):
        ax.bar([i + 0.27 * j for i in x], [r[k] for r in rows], 0.27, label=lab)
    ax.scatter([i + 0.27 for i in x], [r["target"] for r in rows], marker="_", s=300, color="k", label="target")
    ax.set_xticks([i + 0.27 for i in x], [r["task"] for r in rows], fontsize=8)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"{len(tasks)} tasks -> {len(groups)} adapters")
    ax.legend(fontsize=7)
    res.figure = fig
    res.write(a.out)


if __name__ == "__main__":
    main()
