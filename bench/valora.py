"""VaLoRA benchmark: every policy on Poisson load over 16 adapters -> docs/results/valora.{json,md,png}.

    timed python bench/valora.py [--quick] [--adapters DIR] [--requests N] [--skews 0.2,0.8] [--seed 0]
    python bench/valora.py --combine PART.json ...      # one report from per-skew / per-seed parts

A full run is long on 2 cores, so it can be split into parts (``--skews`` and ``--seed``, each written with
``--name`` under ``--out``) that ``--combine`` merges: seed 0 gives the headline numbers, further seeds the
run-to-run spread. Each part calibrates its own rate at start-up (recorded per part).
Adapters default to the trained ones (``bench/valora_adapters.py`` writes them to <cache>/lora/adapters).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgecloud.errors import UserError
from edgecloud.lora.bench import bench_data, ratios
from edgecloud.lora.cli import DEFAULT_TABLE
from edgecloud.lora.orchestrator import POLICIES
from edgecloud.results import Result, check_out_dir

BASELINES = ("slora", "punica", "dlora")


def combine(paths: list[Path]) -> tuple[dict, int]:
    """Merge part results: the lowest seed's runs are the headline, every seed's ratios give the spread.

    An input may also be an earlier combined report (it has ``parts``): its headline runs, every seed's ratios and
    its parts' provenance are carried over, so a new skew can be added without re-measuring (or keeping) old parts.
    """
    parts = []
    for p in paths:
        try:
            parts.append(json.loads(Path(p).read_text()) | {"_path": str(p)})
        except (OSError, ValueError) as e:
            raise UserError(f"--combine {p}: not a readable bench result ({e})") from None
    seed0 = min(p["provenance"]["seed"] for p in parts)
    head = {"runs": {}, "saturation": {}}
    parts_meta, per_seed, seen = [], {}, {}
    parts = sorted(parts, key=lambda p: p["provenance"]["seed"])
    for p in parts:
        seed, skews = p["provenance"]["seed"], p["skews"]
        if "parts" in p:  # an earlier combined report
            metas = p["parts"]
            for k, v in p["per_seed"].items():
                for s, by_seed in v.items():
                    per_seed.setdefault(k, {}).setdefault(s, {}).update(by_seed)
        else:
            metas = [{"seed": seed, "skews": skews, "calibration": p["calibration"],
                      "valora_cost_model": p["valora_cost_model"], "mode_step_ms": p["mode_step_ms"],
                      "commit": p["provenance"].get("commit"), "wall_s": p["provenance"].get("wall_s")}]
            for k, v in ratios(p, skews).items():
                for s, x in v.items():
                    per_seed.setdefault(k, {}).setdefault(s, {})[str(seed)] = x
        for m in metas:
            for s in m["skews"]:
                if (m["seed"], str(s)) in seen:
                    raise UserError(f"--combine {p['_path']}: seed {m['seed']} skew {s} is also in "
                                    f"{seen[m['seed'], str(s)]}; give each (seed, skew) once")
                seen[m["seed"], str(s)] = p["_path"]
        parts_meta += metas
        if seed == seed0:
            for k in ("runs", "saturation"):
                head[k].update(p[k])
            for k in ("modes_match_reference", "chooser_vs_oracle", "adapters", "requests", "max_new_tokens",
                      "switch_cost", "paper_latency_ratio_vs_baselines", "adapter_names", "load", "clients",
                      "sat_requests", "slo_s"):
                head.setdefault(k, p[k])
            head["modes_match_reference"] = head["modes_match_reference"] and p["modes_match_reference"]
    order = ["0.2", "0.5", "0.8", "zipf"]
    head["skews"] = [s for s in order if any(k.startswith(f"{s}/") for k in head["runs"])]
    head.update(ratios(head, head["skews"]))
    head["latency_ratio_vs_each_baseline"] = {f"{s}/{p}": head["runs"][f"{s}/valora"]["mean_latency_s"]
                                              / head["runs"][f"{s}/{p}"]["mean_latency_s"]
                                              for s in head["skews"] for p in POLICIES if p != "valora"}
    head["per_seed"] = per_seed
    head["parts"] = sorted(parts_meta, key=lambda m: (m["seed"], [str(s) for s in m["skews"]]))
    return head, seed0


def write(data: dict, name: str, out: Path, seed: int) -> None:
    res = Result(name, data, seed=seed)
    lo, hi = data["paper_latency_ratio_vs_baselines"]
    per_seed = data.get("per_seed", {})
    side = []
    for s in data["skews"]:
        r = {"skew": s, "valora_mean_latency_s": data["runs"][f"{s}/valora"]["mean_latency_s"]}
        for p in BASELINES:
            r[f"vs_{p}"] = data["latency_ratio_vs_each_baseline"][f"{s}/{p}"]
        r["vs_best_baseline"] = data["mean_latency_ratio_vs_best_baseline"][s]
        seeds = per_seed.get("mean_latency_ratio_vs_best_baseline", {}).get(s, {})
        r["vs_best_all_seeds"] = " / ".join(f"{v:.3f}" for _, v in sorted(seeds.items())) or "-"
        r["paper_vs_baselines"] = f"{lo:.2f}-{hi:.2f}"
        r["goal"] = "<= 0.80" if s == "0.8" else ("<= 1.05" if s == "0.2" else "-")
        r["throughput_vs_sequential"] = data["throughput_ratio_vs_sequential"][s]
        r["saturation_vs_sequential"] = data["saturation_throughput_ratio_vs_sequential"][s]
        seeds = per_seed.get("saturation_throughput_ratio_vs_sequential", {}).get(s, {})
        r["saturation_all_seeds"] = " / ".join(f"{v:.2f}" for _, v in sorted(seeds.items())) or "-"
        side.append(r)
    cal = [c | {"seed": p["seed"], "skew": k} for p in data.get("parts", []) for k, c in p["calibration"].items()]
    res.markdown += ("VaLoRA's mean latency as a ratio of each baseline's (lower is better) beside the paper's "
                     "reported range; its throughput as a multiple of per-adapter sequential serving at the offered "
                     "rate (open loop) and at saturation (closed loop; goal >= 3). `*_all_seeds`: the same ratio in "
                     "every seed's run (run-to-run spread):\n")
    res.table(side, ["skew", "valora_mean_latency_s", "vs_slora", "vs_punica", "vs_dlora", "vs_best_baseline",
                     "vs_best_all_seeds", "paper_vs_baselines", "goal", "throughput_vs_sequential",
                     "saturation_vs_sequential", "saturation_all_seeds"])
    if cal:
        res.markdown += (f"\nRate calibration (offered rate = {data['load']} × the closed-loop saturation of the "
                         f"unmerged batched engine, S-LoRA-like, {data['clients']} clients, on that skew's request "
                         "mix; measured in the same run just before the open-loop runs):\n")
        res.table(cal, ["seed", "skew", "capacity_req_s", "capacity_tok_s", "rate_req_s", "calibration_wall_s"])
    res.markdown += "\nEvery policy, every skew (open loop at the calibrated rate; saturation = closed loop):\n"
    rows = []
    for k, v in data["runs"].items():
        sat = data["saturation"][k]
        ms = v.get("mode_steps", {})
        rows.append({"skew": k.split("/")[0], "policy": k.split("/")[1], **v, "saturation_tok_s": sat["tok_s"],
                     "steps_unmerged/mixture/merged": "/".join(str(ms.get(m, 0))
                                                               for m in ("unmerged", "mixture", "merged"))})
    res.table(rows, ["skew", "policy", "throughput_tok_s", "saturation_tok_s", "mean_latency_s", "p50_latency_s",
                     "p99_latency_s", "mean_ttft_s", "slo_attainment", "switches", "switch_ms_mean",
                     "steps_unmerged/mixture/merged"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    skews = data["skews"]
    for j, p in enumerate(POLICIES):
        xs = [i + 0.16 * j for i in range(len(skews))]
        axes[0].bar(xs, [data["runs"][f"{s}/{p}"]["mean_latency_s"] for s in skews], 0.16, label=p)
        axes[1].bar(xs, [data["saturation"][f"{s}/{p}"]["tok_s"] for s in skews], 0.16, label=p)
    for ax, lab in zip(axes, ("mean latency (s), open loop", "saturation throughput (tok/s)")):
        ax.set_xticks([i + 0.32 for i in range(len(skews))], [f"s={s}" for s in skews])
        ax.set_ylabel(lab)
    axes[0].legend(fontsize=7)
    res.figure = fig
    res.write(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--adapters", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=0, help="requests per (skew, policy); 0: the config's")
    ap.add_argument("--skews", default="", help="comma list of skews to run (0.2,0.5,0.8,zipf); default: all")
    ap.add_argument("--combine", type=Path, nargs="+", default=None, help="part results to merge into one report")
    ap.add_argument("--name", default="valora", help="result name: OUT/NAME.{json,md,png}")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results")
    a = ap.parse_args()
    check_out_dir(a.out)
    if a.combine:
        data, seed = combine(a.combine)
    else:
        skews = None
        if a.skews:
            try:
                skews = [s if s == "zipf" else float(s) for s in a.skews.split(",")]
            except ValueError:
                raise UserError(f"--skews {a.skews!r}: give a comma list of numbers in (0, 1) or zipf") from None
        data = bench_data(a.quick, a.adapters, DEFAULT_TABLE, a.seed, requests=a.requests or None, skews=skews)
        seed = a.seed
    write(data, a.name, a.out, seed)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
