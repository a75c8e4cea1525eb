"""``edgecloud kvcache csr-bench``: the CSR vs KIVI comparison; ``register(app)`` hooks it into the kvcache group."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import typer

from edgecloud.errors import UserError


def csr_bench(
    quick: bool = typer.Option(False, "--quick", help="Small run (1x512 held-out tokens, no size sweep); uses the "
                               "cached dictionaries of the full run (trains them first if missing: long)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    seed: int = typer.Option(0, "--seed", help="Seed for k-means, NeuralDict and online-atom sampling."),
    seq_len: int = typer.Option(0, "--seq-len", min=0, help="Held-out tokens per sequence (0: the preset's)."),
    eval_seqs: int = typer.Option(0, "--eval-seqs", min=0, help="Held-out sequences (0: the preset's)."),
    atoms: int = typer.Option(0, "--atoms", min=0, max=32767, help="Dictionary size N (0: the preset's)."),
    steps: int = typer.Option(-1, "--steps", min=-1, help="NeuralDict steps (-1: the preset's)."),
    out: Path | None = typer.Option(None, "--out", help="Also write the JSON here (atomically)."),
    threads: int = typer.Option(1, "--threads", min=1, max=1024, help="torch CPU threads."),
    model: str = typer.Option("smollm2-135m", "--model", help="Registry model name (smollm2-135m, gemma3-270m) or a "
                              "Llama-family checkpoint."),
    bits: float = typer.Option(0.0, "--bits", min=0.0, help="CSR bit budget per element, all stored bits counted "
                               "(0: the preset's 2.0)."),
    group: int = typer.Option(0, "--group", min=0, help="Layers per shared dictionary (0: the preset's: 3, or 6 for "
                              "gemma3-270m)."),
    dictionaries: Path | None = typer.Option(None, "--dictionaries", help="Use this dictionary file (safetensors) "
                                             "for CSR instead of the cache; refused if for another model/shape."),
    qa: int = typer.Option(0, "--qa", min=0, help="Also score answer F1 on this many SQuAD and FanOutQA questions."),
    sink: int = typer.Option(-1, "--sink", min=-1, help="First tokens CSR keeps in fp16, counted in bits/element "
                             "(-1: the preset's 4, or 3 for gemma3-270m)."),
    keyprep: str = typer.Option("preset", "--keyprep", help="Keys before coding: none, center (minus the channel "
                                "mean) or center+qscale (also weighted by the queries' RMS per RoPE pair); preset: "
                                "none, center+qscale for gemma3-270m (with 3 sinks, k-means dictionaries)."),
) -> None:
    """Bits per KV element, perplexity, top-1 agreement with fp16, codec time: fp16, KIVI-2/4, CSR variants."""
    from edgecloud.atomic import write_text
    from edgecloud.kvcache.csr.bench import BenchConfig, run
    from edgecloud.llm.engine import Engine
    from edgecloud.llm.models import load_model
    from edgecloud.results import Result, check_out_file

    if out is not None:
        check_out_file(out)  # before minutes of compute
    if threads < 1:
        raise UserError(f"--threads={threads}: use 1 or more")
    if out is not None:
        check_out_file(out)
    from edgecloud.kvcache.csr.bench import preset

    cfg = preset(BenchConfig.quick(seed) if quick else BenchConfig(seed=seed), model)
    if keyprep != "preset":
        cfg = replace(cfg, keyprep="" if keyprep == "none" else keyprep)  # a bad mode is a UserError here
    for name, val, ok in (("seq_len", seq_len, seq_len > 0), ("eval_seqs", eval_seqs, eval_seqs > 0),
                          ("atoms", atoms, atoms > 0), ("steps", steps, steps >= 0), ("bits", bits, bits > 0),
                          ("group", group, group > 0), ("sink", sink, sink >= 0)):
        if ok:
            cfg = replace(cfg, **{name: val})
    if cfg.seq_len < cfg.chunk or cfg.atoms > 32767:
        raise UserError(f"--seq-len must be >= {cfg.chunk} and --atoms <= 32767")
    from edgecloud.kvcache.csr.bench import budget
    from edgecloud.kvcache.csr.qa import QAConfig

    budget(cfg, cfg.atoms)  # a bit budget the coder cannot meet fails here, before any compute
    if dictionaries is not None and not dictionaries.is_file():
        raise UserError(f"--dictionaries {dictionaries}: no such file")
    engine = Engine(load_model(model), threads=threads)  # a loader failure is a UserError, never a swapped model
    log = (lambda m: print(m, file=sys.stderr)) if as_json else print
    res = Result("csr", run(cfg, engine, log=log, qa=QAConfig(squad=qa, fanoutqa=qa) if qa else None,
                            dict_file=dictionaries), seed=seed)
    if out is not None:
        write_text(out, res.to_json(indent=1) + "\n")
    if as_json:
        print(res.to_json())
    else:
        for k, v in res.data.items():
            if not isinstance(v, list | dict):
                print(f"{k}: {v}")


def register(app: typer.Typer) -> None:
    app.command("csr-bench")(csr_bench)


app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
app.callback()(lambda: None)  # keep a command group even with one command
register(app)

if __name__ == "__main__":
    app()
