"""``edgecloud llm``: the shared language-model substrate (batched engine and its benchmark)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.command("models")
def models_cmd() -> None:
    """List the registry models that load offline."""
    from edgecloud.llm.models import REGISTRY

    for name, spec in REGISTRY.items():
        print(f"{name}\t{'chat' if spec.chat else 'base'}\t{spec.install}")


@app.command("bench")
def bench_cmd(
    quick: bool = typer.Option(False, "--quick", help="Shorter prompts and fewer steps: ~2 minutes on 2 cores."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (with provenance)."),
    model: str = typer.Option("smollm2-135m", "--model", help="Registry name or a transformers checkpoint dir."),
    seed: int = typer.Option(0, "--seed", help="Seed (the bench is greedy; kept for provenance)."),
    threads: int = typer.Option(0, "--threads", min=0, max=256, help="torch threads (0: idle cores)."),
    out: Path | None = typer.Option(None, "--out", help="Also write NAME.{json,md,png} into this folder."),
    name: str = typer.Option("llm_engine", "--name", help="Result name (file stem) for --out, e.g. "
                             "llm_engine_2threads for a run at another thread count."),
    peer: str = typer.Option("", "--peer", help="'vllm' (a vLLM OpenAI server at --peer-url, started if vllm is "
                             "importable and none answers) or 'llamacpp' (llama-cpp-python, if importable)."),
    peer_url: str = typer.Option("http://127.0.0.1:8000", "--peer-url", help="The peer server's base URL."),
    rounds: int = typer.Option(1, "--rounds", min=1, max=50, help="With --peer vllm: interleaved rounds (ours, "
                               "peer, ours, ...) of prefill, batch-1 decode and the largest batch; medians reported."),
) -> None:
    """Prefill tok/s and decode tok/s at batch 1, 4, 16 vs batch-1 sequential; bf16 vs fp32; exactness check."""
    from edgecloud.errors import UserError
    from edgecloud.llm.bench import EngineBenchConfig, check_peer, peer_llamacpp, peer_vllm, run, start_vllm
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model
    from edgecloud.progress import progress_bar
    from edgecloud.results import check_out_dir

    if peer not in ("", "vllm", "llamacpp"):
        raise UserError(f"--peer {peer!r}: choose vllm or llamacpp")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"--name {name!r}: use letters, digits, '_' or '-' (it is a file name)")
    if out is not None:
        check_out_dir(out)
    if rounds > 1 and peer != "vllm":
        raise UserError(f"--rounds {rounds}: interleaved rounds need --peer vllm")
    check_peer(peer, peer_url)  # an absent peer fails now, not after the measurement
    cfg = EngineBenchConfig.quick(seed) if quick else EngineBenchConfig(seed=seed)
    engine = Engine(load_model(model), threads=threads or None)
    with progress_bar("llm bench", enabled=not as_json) as bar:
        res = run(engine, cfg, progress=bar)
    if peer == "vllm":
        proc = None
        try:
            try:
                res.update(peer_vllm(peer_url, engine, cfg, rounds))
            except UserError:
                proc, url = start_vllm(str(engine.lm.path))  # none answered: start one if vllm is installed
                res.update(peer_vllm(url, engine, cfg, rounds))
        finally:
            if proc is not None:
                proc.terminate()
    elif peer == "llamacpp":
        from edgecloud.llm.models import REGISTRY, _gguf_path

        if model not in REGISTRY:
            raise UserError(f"--peer llamacpp: needs a registry model's GGUF; --model {model!r} is a directory")
        res.update(peer_llamacpp(engine, cfg, str(_gguf_path(REGISTRY[model]))))
    if peer:
        res["prefill_ratio_vs_peer"] = res["prefill_tok_s"] / res["peer_prefill_tok_s"]
        res["decode_ratio_vs_peer"] = res["decode_tok_s_batch1"] / res["peer_decode_tok_s_batch1"]
    result = engine_result(res, seed, name)
    if out is not None:
        result.write(out)
    print(result.to_json() if as_json else result.markdown)


def engine_result(res: dict, seed: int, name: str = "llm_engine"):
    """The benchmark's numbers as a :class:`~edgecloud.results.Result` (table + plot)."""
    from edgecloud.results import Result

    peer = f", {res['peer']} peer in the same run" if "peer" in res else ""
    r = Result(name, res, seed=seed, title=f"Batched engine: prefill and decode throughput at {res['threads']} "
               f"thread(s){peer}")
    batches = [int(k.removeprefix("decode_tok_s_batch")) for k in res
               if k.startswith("decode_tok_s_batch") and k.removeprefix("decode_tok_s_batch").isdigit()]
    rows = [{"batch": b, "fp32 tok/s": res[f"decode_tok_s_batch{b}"], "speed-up vs batch 1 sequential":
             res[f"batch{b}_speedup"], "bf16 tok/s": res.get(f"decode_tok_s_batch{b}_bf16"),
             "transformers-layers fp32 tok/s": res.get(f"decode_tok_s_batch{b}_transformers")} for b in batches]
    rows.append({"batch": "goal", "speed-up vs batch 1 sequential": "batch 16 >= 6x"})
    r.markdown = (f"Model {res['model']}, {res['threads']} torch thread(s). Decode throughput is aggregate over "
                  f"the batch; batch 1 is the sequential baseline. Decode path: {res.get('decode_path', '?')} "
                  f"(edgecloud.llm.fused; the last column runs the same batches through transformers' layers)."
                  f"\n\n")
    r.table(rows)
    bf16 = f", {res['prefill_tok_s_bf16']:.0f} tok/s bf16" if "prefill_tok_s_bf16" in res else ""
    r.markdown += (f"\nPrefill of a {res['prefill_tokens']}-token prompt: {res['prefill_tok_s']:.0f} tok/s fp32"
                   f"{bf16}. Perplexity on held-out pydoc text: "
                   f"{res['ppl_fp32']:.3f} fp32, {res['ppl_bf16']:.3f} bf16 "
                   f"({100 * res['ppl_bf16_rel_change']:+.2f}%). Batched equals single-sequence: "
                   f"{res['batched_matches_single']} (max first-logit difference {res['max_logit_diff']:.1e}).\n")
    if "peer" in res:
        r.markdown += (f"\nPeer {res['peer']}: prefill {res['peer_prefill_tok_s']:.0f} tok/s, decode "
                       f"{res['peer_decode_tok_s_batch1']:.1f} tok/s at batch 1 (ours / peer: prefill "
                       f"{res['prefill_ratio_vs_peer']:.2f}x, decode {res['decode_ratio_vs_peer']:.2f}x).\n")
        if res.get("rounds", 1) > 1:
            top = max(batches)

            def span(k: str) -> str:
                return ", ".join(f"{x:.2f}" for x in res[k])

            r.markdown += (f"\nMedians over {res['rounds']} interleaved rounds (ours, peer, ours, ... on the same "
                           f"machine state); per round, ours / peer: prefill {span('prefill_ratio_vs_peer_rounds')}; "
                           f"batch-1 decode {span('decode_ratio_vs_peer_rounds')}; batch {top} / batch 1: "
                           f"{span(f'batch{top}_speedup_rounds')}.\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(batches, [res[f"decode_tok_s_batch{b}"] for b in batches], "o-", label="fp32")
    if all(f"decode_tok_s_batch{b}_bf16" in res for b in batches):
        ax.plot(batches, [res[f"decode_tok_s_batch{b}_bf16"] for b in batches], "s--", label="bf16")
    ax.plot(batches, [res[f"decode_tok_s_batch{batches[0]}"]] * len(batches), ":", label="batch 1 sequential")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequences in the batch")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.set_title(f"{res['model']} decode throughput")
    ax.legend()
    fig.tight_layout()
    r.figure = fig
    return r
