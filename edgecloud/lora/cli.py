"""``edgecloud lora``: VaLoRA — adapter training (peft), the ATMM profiler, and the multi-adapter benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
DEFAULT_TABLE = Path(__file__).with_name("dispatch.json")


@app.command("train")
def train_cmd(out: Path = typer.Option(..., help="adapter directory to write (peft format)"),
              task: list[str] = typer.Option(["arith"], help="task(s); several = one fused adapter"),
              steps: int = typer.Option(120, min=1), rank: int = typer.Option(4, min=1, max=64),
              lr: float = typer.Option(2e-3, min=1e-6), batch: int = typer.Option(8, min=1),
              checkpoint_every: int = typer.Option(50, min=1), seed: int = 0,
              base: str = "smollm2-135m") -> None:
    """Train one LoRA adapter on the given task(s) with peft; checkpoints under OUT/checkpoint-<step>."""
    from edgecloud.errors import UserError
    from edgecloud.lora.tasks import TASKS
    from edgecloud.lora.train import TrainConfig, train
    from edgecloud.results import check_out_dir

    bad = [t for t in task if t not in TASKS]
    if bad:
        raise UserError(f"--task {bad[0]!r}: unknown; choose from {sorted(TASKS)}")
    check_out_dir(out.parent)
    info = train(TrainConfig(tasks=tuple(task), steps=steps, rank=rank, lr=lr, batch=batch,
                             checkpoint_every=checkpoint_every, seed=seed), out, base)
    print(json.dumps(info))


@app.command("eval")
def eval_cmd(adapter: Path = typer.Option(None, help="peft adapter dir (omit: base model)"),
             task: str = "arith", n: int = typer.Option(40, min=1), seed: int = 0, base: str = "smollm2-135m",
             json_out: bool = typer.Option(False, "--json")) -> None:
    """Exact match on a task's held-out split, base or adapter, through the batched serving path."""
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model
    from edgecloud.lora.adapters import load_adapter
    from edgecloud.lora.layer import LoRAModel
    from edgecloud.lora.train import evaluate
    from edgecloud.results import report

    e = Engine(load_model(base))
    lm = LoRAModel(e.model, base)
    name = None
    if adapter is not None:
        ad = load_adapter(adapter, e.model, base)
        lm.add(ad)
        name = ad.name
    acc = evaluate(e, lm, name, task, n, seed)
    print(report({"task": task, "adapter": name, "exact_match": acc, "n": n}, seed=seed) if json_out
          else f"{task} {name or 'base'}: {acc:.3f}")


@app.command("profile")
def profile_cmd(out: Path = typer.Option(DEFAULT_TABLE, help="dispatch table JSON (written atomically)"),
                repeats: int = typer.Option(5, min=1), seed: int = 0,
                json_out: bool = typer.Option(False, "--json")) -> None:
    """Time every ATMM implementation over (tokens, adapters, rank); write the dispatch table (fastest over two
    timing passes); score the chooser on shapes *between* the grid points, timed independently (chooser vs the
    per-shape oracle, the re-measured oracle's own floor, speedup vs the worst fixed choice)."""
    import dataclasses

    import torch

    from edgecloud.lora.atmm import HELD_OUT, Grid, combine, evaluate, profile, table_from, write_table
    from edgecloud.results import check_out_file, report

    check_out_file(out)
    torch.set_num_threads(1)
    g = Grid(repeats=repeats)
    table = table_from(combine(profile(g, seed), profile(g, seed + 1)))
    h = dataclasses.replace(HELD_OUT, repeats=repeats)
    floor, held = profile(h, seed + 2), profile(h, seed + 3)
    ev = evaluate(table, held, remeasured=floor)
    ev["on_grid"] = evaluate(table, profile(g, seed + 4))
    ev["clock"] = "thread CPU time" if torch.get_num_threads() == 1 else "wall clock"
    table["evaluation"] = ev
    write_table(table, out)
    print(report(ev, seed=seed) if json_out else json.dumps(ev, indent=1))


@app.command("bench")
def bench_cmd(quick: bool = False, adapters: Path = typer.Option(None, help="dir of trained peft adapters"),
              table: Path = typer.Option(DEFAULT_TABLE), seed: int = 0, base: str = "smollm2-135m",
              requests: int = typer.Option(0, min=0, max=10000, help="requests per (skew, policy); 0: the config's"),
              json_out: bool = typer.Option(False, "--json")) -> None:
    """VaLoRA vs sequential / S-LoRA / Punica / dLoRA on Poisson load over 16 adapters."""
    from edgecloud.lora.bench import bench_data
    from edgecloud.results import report

    data = bench_data(quick, adapters, table, seed, base, requests=requests or None)
    print(report(data, seed=seed) if json_out else json.dumps(data, indent=1))


@app.command("serve")
def serve_cmd(host: str = typer.Option("127.0.0.1", "--host"),
              port: int = typer.Option(8009, "--port", min=1, max=65535),
              adapters: Path = typer.Option(None, help="directory of peft adapters (default: the trained ones in "
                                                        "the cache, <cache>/lora/adapters)"),
              table: Path = typer.Option(DEFAULT_TABLE, help="ATMM dispatch table"),
              base: str = "smollm2-135m",
              max_batch: int = typer.Option(16, "--max-batch", min=1, max=256),
              max_body_mb: float = typer.Option(1.0, "--max-body-mb", min=0.001, max=1024),
              threads: int = typer.Option(1, "--threads", min=1, max=256)) -> None:
    """OpenAI-compatible server: GET /v1/models, POST /v1/completions and /v1/chat/completions (stream too);
    `model` = "<base>" or "<base>:<adapter>"; adapters hot-load from --adapters on first use."""
    from edgecloud.errors import UserError
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model
    from edgecloud.lora.atmm import Dispatch
    from edgecloud.lora.layer import LoRAModel
    from edgecloud.lora.server import ServeConfig, serve
    from edgecloud.paths import cache_root

    cfg = ServeConfig(max_batch=max_batch, max_body_mb=max_body_mb)  # bad limits fail before the model loads
    if adapters is not None and not adapters.is_dir():
        raise UserError(f"--adapters {adapters}: not a directory; pass a directory of peft adapters "
                        "(`python bench/valora_adapters.py` trains them into <cache>/lora/adapters)")
    adapters = adapters or cache_root() / "lora" / "adapters"  # absent: the base model alone is served
    dispatch = Dispatch.load(table) if table.exists() else Dispatch()
    e = Engine(load_model(base), threads=threads)
    serve(e, LoRAModel(e.model, base, dispatch=dispatch), base, adapters, host, port, cfg)
