"""MPIC benchmark, one run: every method side by side on gold-answer QA; writes docs/results/mpic.{md,json,png}.

    python bench/mpic.py            # 30 requests: 6 SQuAD articles x 4 questions + 6 passkey, 4-6 passages each
    python bench/mpic.py --quick    # the CLI's --quick workload
    python bench/mpic.py --from-json run.json   # render a saved `edgecloud kvcache bench --json` run (its provenance
                                    # is kept as measured_provenance); with --peer vllm: add the peer to it
    python bench/mpic.py --peer vllm --peer-url http://127.0.0.1:8000   # + TTFT of a running vLLM server (prefix
                                    # caching on, warmed on the same chunks) on the same token ids, interleaved
                                    # with MPIC-k; adds ttft_ratio_vs_vllm (scripts/peers_vllm.sh starts one)

The peer is optional and never started here: run vLLM yourself (docs/mpic.md). An unreachable peer is one error
line before any compute, and no peer number is ever reported that was not measured in this run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgecloud.errors import UserError
from edgecloud.kvcache.bench import BenchConfig, peer_ttft, run, ttft_run
from edgecloud.kvcache.cli import format_table
from edgecloud.llm.engine import Engine
from edgecloud.llm.models import load_model
from edgecloud.llm.peers import VLLMPeer
from edgecloud.results import Result, check_out_dir

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"


def plot(out: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = out["methods"]
    names = list(m)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, [m[n]["ttft_s"] for n in names], color=["#777"] * 3 + ["#4a7"] * (len(names) - 3))
    a.set_ylabel("mean TTFT (s)")
    a.tick_params(axis="x", rotation=60)
    a.set_title(f"TTFT, {out['requests']} QA requests, ~{out['prompt_tokens_mean']:.0f} tokens")
    for n in names:
        lo, hi = m[n]["accuracy_ci"]
        b.errorbar(m[n]["ttft_s"], m[n]["accuracy"], yerr=[[m[n]["accuracy"] - lo], [hi - m[n]["accuracy"]]],
                   fmt="o", capsize=3)
        b.annotate(n, (m[n]["ttft_s"], m[n]["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    b.set_xlabel("mean TTFT (s)")
    b.set_ylabel("answer accuracy vs gold (95% bootstrap CI)")
    b.set_title("accuracy vs TTFT")
    fig.tight_layout()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--peer", choices=["vllm"], default=None)
    ap.add_argument("--peer-url", default="http://127.0.0.1:8000")
    ap.add_argument("--from-json", type=Path, default=None)
    ap.add_argument("--fidelity", action="store_true", help="first-token study on a few hundred requests -> "
                    "mpic_fidelity.{md,json,png} (no decoding; run it under `low`)")
    ap.add_argument("--ttft", action="store_true", help="TTFT only (no decoding) -> mpic_ttft.{md,json}; with "
                    "--peer vllm the peer too: the part to run under `timed`")
    ap.add_argument("--no-baselines", action="store_true", help="--ttft: only full, prefix and MPIC-k")
    ap.add_argument("--repeats", type=int, default=2, help="--ttft: time each method this often, keep the fastest")
    ap.add_argument("--fidelity-json", type=Path, default=None, help="with --from-json: take the headline "
                    "first_token_agreement (and its CI) from this --fidelity study's JSON (more requests)")
    ap.add_argument("--max-s", type=float, default=0.0, help="--fidelity: stop starting requests after this long")
    ap.add_argument("--dump", default=None, help="--fidelity: also write the raw per-request rows here")
    ap.add_argument("--resume", default=None, help="--fidelity: an earlier --dump; its requests are kept (pooled) "
                    "and the run goes on from the next one")
    a = ap.parse_args()
    if a.fidelity:
        return main_fidelity(a)
    try:
        check_out_dir(a.out)
        peer = VLLMPeer(a.peer_url) if a.peer else None  # an absent peer fails here, before any compute
        if a.fidelity_json and not a.from_json:
            raise UserError("--fidelity-json folds a study into a saved run: give --from-json RUN.json too")
        if a.from_json:
            out = load_run(a.from_json)
            if a.fidelity_json:
                out = fold_study(out, a.fidelity_json)
            cfg = BenchConfig(**{**out["config"], "ks": tuple(out["config"]["ks"])})
            engine = Engine(load_model(out["model"]), threads=out["threads"]) if peer else None
        else:
            cfg = BenchConfig.quick(a.seed) if a.quick else BenchConfig(seed=a.seed)
            engine = Engine(load_model(a.model), threads=a.threads)
            progress = lambda i, n: print(f"request {i}/{n}", file=sys.stderr, flush=True)  # noqa: E731
            if a.ttft:
                out = ttft_run(engine, cfg, repeats=a.repeats, baselines=not a.no_baselines, progress=progress)
                write_ttft(out, a)  # written before the peer phase: a peer that stalls loses only its own numbers
            else:
                out = run(engine, cfg, progress=progress)
        if peer is not None:
            with peer:
                out.update(peer_ttft(engine, cfg, peer))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    (write_ttft if a.ttft else write)(out, a)


def write_ttft(out: dict, a) -> None:
    res = Result("mpic_ttft", out, seed=out.get("seed", a.seed), title="MPIC TTFT on quiet cores (no decoding)")
    lines = [f"{out['requests']} requests, {out['prompt_tokens_mean']:.0f} prompt tokens on average, model "
             f"{out['model']}, {out['threads']} torch thread(s), fastest of {out['repeats']} per request and method",
             "", "| method | mean TTFT s | / full prefill | recomputed |", "|---|---|---|---|"]
    for m, t in out["ttft_s"].items():
        rec = out["recompute_frac"].get(m)
        lines.append(f"| {m} | {t:.3f} | {out['ttft_over_full'][m]:.3f} | {'-' if rec is None else f'{rec:.0%}'} |")
    if "ttft_ratio_vs_vllm" in out:
        hit = out["vllm_prefix_hit_rate"]
        lines += ["", f"vLLM ({out['peer']['model']}, prefix caching on, warmed on the same {out['warm_chunks']} "
                  f"chunks), same token ids, interleaved with MPIC-{out['k']}: TTFT vLLM {out['ttft_vllm_s']:.3f} s, "
                  f"MPIC-{out['k']} {out['ttft_mpic_beside_vllm_s']:.3f} s; MPIC-{out['k']} / vLLM = "
                  f"{out['ttft_ratio_vs_vllm']:.3f}" + (f"; vLLM prefix-cache hit rate {hit:.0%}" if hit is not None
                                                        else "") + "."]
    res.markdown = "\n".join(lines)
    res.write(a.out)
    print(res.markdown)


def main_fidelity(a) -> None:
    from edgecloud.kvcache.fidelity import FidelityConfig, fidelity, format_fidelity

    try:
        check_out_dir(a.out)
        cfg = FidelityConfig(seed=a.seed, max_s=a.max_s)
        engine = Engine(load_model(a.model), threads=a.threads)
        out = fidelity(engine, cfg, progress=lambda i, n: print(f"request {i}/{n}", file=sys.stderr, flush=True),
                       dump=a.dump, resume=a.resume)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    res = Result("mpic_fidelity", out, seed=a.seed, title="MPIC first-token fidelity: no decoding, more requests")
    res.markdown = format_fidelity(out)
    res.figure = plot_fidelity(out)
    res.write(a.out)
    print(res.markdown)


def plot_fidelity(out: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    m = out["methods"]
    names = list(m)
    ag = [m[n]["agreement"] for n in names]
    err = [[g - m[n]["agreement_ci"][0] for n, g in zip(names, ag)], [m[n]["agreement_ci"][1] - g
                                                                       for n, g in zip(names, ag)]]
    a.errorbar(range(len(names)), ag, yerr=err, fmt="o", capsize=4)
    a.axhline(0.95, ls="--", c="r", lw=1, label="goal 0.95")
    a.set_xticks(range(len(names)), names)
    a.set_ylabel("first-token agreement (95% Wilson CI)")
    a.set_title(f"n = {out['requests']} requests")
    a.legend()
    head = m[f"mpic-{out['k']}"]
    b.hist([mi["ref_gap"] for mi in out["misses"]], bins=20, color="#c44", label=f"MPIC-{out['k']} disagreements")
    b.axvline(out["tie_gap"], ls="--", c="k", lw=1, label=f"near-tie threshold {out['tie_gap']}")
    b.set_xlabel("reference top-2 logit gap at the first answer token")
    b.set_ylabel("requests")
    b.set_title(f"{head['disagreements']} disagreements, {head['misses_near_tie']} near-ties")
    b.legend()
    fig.tight_layout()
    return fig


def load_run(path: Path) -> dict:
    """A saved run (this script's JSON or `kvcache bench --json`); its provenance is kept as measured_provenance,
    the new file's provenance then names the command that re-rendered it (or added the peer to it); an earlier
    re-render's provenance goes to ``rendered_by`` (the vLLM numbers keep the command that measured them)."""
    try:
        out = json.loads(Path(path).read_text())
        out["config"], out["model"], out["threads"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--from-json {path}: not a saved MPIC bench run ({type(e).__name__}: {e})") from None
    render = out.pop("provenance", None)
    if out.get("measured_provenance") and render and render != out["measured_provenance"]:
        out["rendered_by"] = [*out.get("rendered_by", []), render]  # earlier additions (the peer) keep theirs
    out["measured_provenance"] = out.get("measured_provenance") or render
    return out


def fold_study(out: dict, path: Path) -> dict:
    from edgecloud.kvcache.fidelity import fold_into_run

    try:
        study = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--fidelity-json {path}: cannot read it ({type(e).__name__}: {e})") from None
    return fold_into_run(out, study, str(path))


def write(out: dict, a) -> None:
    res = Result("mpic", out, seed=out.get("seed", a.seed), title="MPIC on gold-answer QA (SQuAD v1.1 dev + passkey)")
    res.markdown = format_table(out)
    if "ttft_ratio_vs_vllm" in out:
        hit = out["vllm_prefix_hit_rate"]
        res.markdown += (f"\n\nvLLM ({out['peer']['model']}, automatic prefix caching on, warmed on the same "
                         f"{out['warm_chunks']} chunks) on the same token ids, interleaved with MPIC-{out['k']}: TTFT "
                         f"vLLM {out['ttft_vllm_s']:.3f} s, MPIC-{out['k']} {out['ttft_mpic_beside_vllm_s']:.3f} s; "
                         f"MPIC-{out['k']} / vLLM = {out['ttft_ratio_vs_vllm']:.2f}"
                         + (f"; vLLM prefix-cache hit rate {hit:.0%} of prompt tokens" if hit is not None else "")
                         + ".\n")
    res.figure = plot(out)
    res.write(a.out)
    print(res.markdown)


if __name__ == "__main__":
    main()
