"""``edgecloud kvcache``: MPIC serving and benchmark. torch/transformers are imported inside the commands."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick", help="8 requests (6 SQuAD + 2 passkey): a few minutes on 2 cores"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    model: str = typer.Option("smollm2-135m", "--model", help="registry name or a transformers checkpoint dir"),
    seed: int = typer.Option(0, "--seed"),
    k: int = typer.Option(32, "--k", min=0, max=4096, help="the MPIC k reported as the headline"),
    threads: int = typer.Option(0, "--threads", min=0, max=1024, help="torch threads (0: idle cores)"),
    qa: str = typer.Option("", "--qa", help="JSONL QA file (question, answers, context, distractors) instead of "
                           "SQuAD v1.1 dev + passkey"),
) -> None:
    """Full prefill vs prefix caching vs full reuse vs CacheBlend vs MPIC-k on gold-answer QA requests."""
    from edgecloud.kvcache.bench import BenchConfig, run
    from edgecloud.kvcache.qa import load_qa_file
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model
    from edgecloud.progress import progress_bar

    cfg = BenchConfig.quick(seed) if quick else BenchConfig(seed=seed)
    cfg.k = k
    items = load_qa_file(qa) if qa else None
    engine = Engine(load_model(model), threads=threads or None)
    with progress_bar("mpic bench", enabled=not as_json) as update:
        out = run(engine, cfg, progress=update, items=items)
    if as_json:
        from edgecloud.results import report

        print(report(out, seed=seed))
        return
    print(format_table(out))


def format_table(out: dict) -> str:
    from edgecloud.results import fmt

    def ci(r, key):
        lo, hi = r[f"{key}_ci"]
        return f"{r[key]:.2f} [{lo:.2f}, {hi:.2f}]"

    src = ", ".join(f"{n} {s}" for s, n in out["sources"].items())
    lines = [f"{out['requests']} requests ({src}), {out['prompt_tokens_mean']:.0f} prompt tokens and "
             f"{out['chunks_mean']:.1f} passages on average, model {out['model']}, {out['threads']} threads", "",
             "| method | TTFT s | TTFT / full | recomputed | accuracy [95% CI] | F1 [95% CI] | first token | "
             f"top-1 | KL | exact (answers <= {out['config']['exact_max_tokens']} tokens) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    full = out["methods"]["full"]["ttft_s"]
    for m, r in out["methods"].items():
        lines.append(f"| {m} | {r['ttft_s']:.3f} | {r['ttft_s'] / full:.2f} | {r['recompute_frac']:.0%} | "
                     f"{ci(r, 'accuracy')} | {ci(r, 'f1')} | {r['first_token_agreement']:.3f} | "
                     f"{r['top1_agreement']:.3f} | {r['kl']:.4f} | {fmt(r['exact_match_short'], 2)} |")
    if "floor_bf16" in out:
        n_bf16 = out["floor_bf16"].get("requests", out["requests"])
        lines += ["", f"full-bf16 (the float floor) ran on the first {n_bf16} requests."]
    fta = f"{out['first_token_agreement']:.3f}"
    if "first_token_agreement_ci" in out:  # folded in from the larger no-decoding study (bench/mpic.py)
        lo, hi = out["first_token_agreement_ci"]
        fta += (f" [{lo:.3f}, {hi:.3f}] over {out['first_token_agreement_requests']} requests (the no-decoding "
                f"study; this run's {out['requests']}: {out['first_token_agreement_run']:.3f})")
    lines += ["", f"MPIC-{out['k']}: accuracy {out['accuracy_mpic']:.3f} vs full prefill {out['accuracy_full']:.3f} "
              f"(delta {out['accuracy_delta']:+.3f}); first-token agreement {fta}, "
              f"top-1 {out['top1_agreement']:.3f}, KL {out['kl']:.4f}; TTFT {out['ttft_ratio_vs_full']:.2f}x full "
              f"prefill, {out['ttft_ratio_vs_prefix']:.2f}x prefix caching. Exact match over "
              f"{out['short_answers']} short answers."]
    return "\n".join(lines)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8008, "--port", min=1, max=65535),
    model: str = typer.Option("smollm2-135m", "--model"),
    store: str = typer.Option("", "--store", help="KV store directory (default: cache dir / kvstore)"),
    k: int = typer.Option(32, "--k", min=0, max=4096),
    mem_mb: int = typer.Option(256, "--mem-mb", min=1, help="memory tier budget (MB)"),
    max_body_mb: float = typer.Option(2.0, "--max-body-mb", min=0.001, max=1024,
                                      help="larger request bodies get 413 before they are read"),
) -> None:
    """HTTP generation with chunk reuse: POST /generate {system, chunks, question}; POST /chunks; GET /health."""
    from edgecloud.kvcache.server import ServeConfig, serve
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model

    ServeConfig(k=k, mem_mb=mem_mb, max_body_mb=max_body_mb)  # bad limits fail before the model loads
    serve(Engine(load_model(model)), host, port, store or None, k=k, mem_mb=mem_mb, max_body_mb=max_body_mb)


from edgecloud.kvcache.csr.cli import register as _register_csr  # noqa: E402  (csr-bench joins this group)

_register_csr(app)
