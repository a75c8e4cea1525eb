"""``edgecloud rag``: DRAGON's cloud server, device client and benchmark."""

from __future__ import annotations

import asyncio
import json
import sys

import typer

from edgecloud.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _engine_split(articles: int, seed: int):
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model
    from edgecloud.rag.corpus import make_split

    return Engine(load_model("smollm2-135m"), threads=1), make_split(n_articles=articles, seed=seed)


@app.command("cloud")
def cloud_cmd(port: int = typer.Option(7700, min=0, max=65535), host: str = "127.0.0.1",
              articles: int = typer.Option(40, min=2, help="articles of the dump to use (split device/cloud)"),
              seed: int = 0,
              kv_cache_mb: int = typer.Option(1024, min=0, help="byte budget (MiB) of the public passages' KV cache "
                                              "(LRU, filled on first use); 0 = no cache, full prefill per question"),
              precompute: bool = typer.Option(False, help="compute every passage's KV before serving (up to the "
                                              "budget; ~46 KB per token for SmolLM2-135M)")) -> None:
    """Serve the cloud side (public documents) until interrupted."""
    from edgecloud.rag.node import CloudServer
    from edgecloud.rag.node import precompute as fill
    from edgecloud.rag.prefix import PassageKV
    from edgecloud.rag.store import load_or_build

    e, sp = _engine_split(articles, seed)
    store = load_or_build("cloud", sp.cloud)
    kv = PassageKV(e, kv_cache_mb << 20) if kv_cache_mb else None
    if kv is not None and precompute:
        held = fill(e, store, kv)
        print(f"passage KV precomputed for {len(store.passages)} passages: {held / 2**20:.0f} MiB held, "
              f"{kv.store.stats['evictions']} evicted by the {kv_cache_mb} MiB budget", file=sys.stderr, flush=True)

    async def serve():
        srv = CloudServer(e, store, host, port, kv=kv)
        p = await srv.start()
        print(f"cloud listening on {host}:{p}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


@app.command("device")
def device_cmd(question: str, cloud: str = typer.Option("127.0.0.1:7700", help="HOST:PORT of the cloud"),
               mode: str = typer.Option("dragon", help="dragon, dragon-device, dragon-cloud, token-sync, sequence"),
               max_new: int = typer.Option(32, min=1), articles: int = typer.Option(40, min=2), seed: int = 0,
               timeout: float = typer.Option(30.0, min=0.1), as_json: bool = typer.Option(False, "--json")) -> None:
    """Ask a question from the device side (private documents), aggregating with the cloud."""
    from edgecloud.rag.node import Device, RagConfig
    from edgecloud.rag.store import load_or_build

    if mode not in ("dragon", "dragon-device", "dragon-cloud", "token-sync", "sequence"):
        raise UserError(f"--mode {mode!r}: use dragon, dragon-device, dragon-cloud, token-sync or sequence")
    host, _, p = cloud.rpartition(":")
    if not host or not p.isdigit():
        raise UserError(f"--cloud {cloud!r}: give HOST:PORT, e.g. 127.0.0.1:7700")
    e, sp = _engine_split(articles, seed)
    store = load_or_build("device", sp.device)
    d = Device(e, store, (host, int(p)), RagConfig(max_new=max_new, seed=seed, timeout_s=timeout))

    async def go():
        try:
            return await d.ask(question, mode)
        finally:
            await d.close()

    a = asyncio.run(go())
    if as_json:
        from edgecloud.results import report

        print(report(a.as_dict(), seed=seed))
        return
    print(a.text)
    if a.fallback:
        print(f"[fallback] {a.fallback}")
    print(f"[{a.agg} aggregation, TTFT {a.ttft_s:.2f} s, {a.per_token_s * 1000:.0f} ms/token, "
          f"acceptance {a.acceptance:.2f}]")


@app.command("bench")
def bench_cmd(quick: bool = False, seed: int = 0, as_json: bool = typer.Option(False, "--json"),
              out: str = typer.Option("", help="also write name.{json,md,png} into this directory")) -> None:
    """Perplexity of every baseline, exactness and two-process latency over the emulated link."""
    from dataclasses import replace

    from edgecloud.rag.bench import BenchConfig, run
    from edgecloud.results import check_out_dir

    if out:
        check_out_dir(out)
    cfg = replace(BenchConfig.quick() if quick else BenchConfig(), seed=seed)
    res = run(cfg)
    if out:
        res.write(out)
    if as_json:
        d = {k: v for k, v in res.data.items() if k not in ("latency", "chi2")}
        from edgecloud.results import report

        print(report(d, seed=seed))
    else:
        print(res.markdown)
        print(json.dumps({k: v for k, v in res.data.items() if isinstance(v, float)}, indent=1))
