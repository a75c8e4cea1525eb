"""``edgecloud kvcache``: MPIC serving and benchmark. torch/transformers are imported inside the commands."""

from __future__ import annotations

import json

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.command()
def bench(
    quick: bool = typer.Option(False, "--quick", help="3x2 requests, shorter chunks: a few minutes on 2 cores"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    model: str = typer.Option("smollm2-135m", "--model", help="registry name or a transformers checkpoint dir"),
    seed: int = typer.Option(0, "--seed"),
    k: int = typer.Option(32, "--k", min=0, max=4096, help="the MPIC k reported as the headline"),
    threads: int = typer.Option(0, "--threads", min=0, max=1024, help="torch threads (0: idle cores)"),
) -> None:
    """Full prefill vs prefix caching vs full reuse vs CacheBlend vs MPIC-k on RAG requests over pydoc topics."""
    from edgecloud.kvcache.bench import BenchConfig, run
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model
    from edgecloud.progress import progress_bar

    cfg = BenchConfig.quick(seed) if quick else BenchConfig(seed=seed)
    cfg.k = k
    if k not in cfg.ks:
        cfg.ks = tuple(sorted({*cfg.ks, k}))
    engine = Engine(load_model(model), threads=threads or None)
    with progress_bar("mpic bench", enabled=not as_json) as update:
        out = run(engine, cfg, progress=update)
    if as_json:
        print(json.dumps(out))
        return
    print(format_table(out))


def format_table(out: dict) -> str:
    lines = [f"{out['requests']} requests, {out['prompt_tokens_mean']:.0f} prompt tokens and "
             f"{out['chunks_mean']:.1f} passages on average, model {out['model']}, {out['threads']} threads", "",
             "| method | TTFT s | total s | TTFT / full | recomputed | top-1 agree | KL | exact match |",
             "|---|---|---|---|---|---|---|---|"]
    full = out["methods"]["full"]["ttft_s"]
    for m, r in out["methods"].items():
        lines.append(f"| {m} | {r['ttft_s']:.3f} | {r['total_s']:.3f} | {r['ttft_s'] / full:.2f} | "
                     f"{r['recompute_frac']:.0%} | {r['top1_agreement']:.3f} | {r['kl']:.4f} | "
                     f"{r['exact_match_rate']:.0%} |")
    lines += ["", f"MPIC-{out['k']}: TTFT {out['ttft_ratio_vs_full']:.2f}x full prefill, "
              f"{out['ttft_ratio_vs_prefix']:.2f}x prefix caching; exact match {out['exact_match_rate']:.0%}"]
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
