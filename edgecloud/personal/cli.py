"""``edgecloud personal``: anonymous user embeddings and questioner-aware responders."""

from __future__ import annotations

import typer

app = typer.Typer(help="Personalization: anonymous user embeddings (IDfree-PL) and questioner-aware responders (QAR).",
                  no_args_is_help=True)


@app.command("corpus")
def corpus(json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
           min_turns: int = typer.Option(50, min=1, help="Count senders with at least this many turns.")) -> None:
    """Counts of the chitchat corpus: conversations, turns, senders (all, and with at least --min-turns)."""
    from edgecloud.personal.chitchat import load_conversations, senders
    from edgecloud.results import report

    convs = load_conversations()
    per = senders(convs)
    data = {"corpus": "chitchat-dataset", "conversations": len(convs), "turns": sum(len(c) for c in convs),
            "senders": len(per), "senders_min_turns": sum(v >= min_turns for v in per.values()),
            "min_turns": min_turns}
    if json_out:
        print(report(data))
    else:
        for k, v in data.items():
            print(f"{k}: {v}")


# ---------------------------------------------------------------------------------------------------------------
# Questioner-aware responders (QAR, issue 16): qar-bench, qar-train, respond. Code in edgecloud/personal/qar/.
# ---------------------------------------------------------------------------------------------------------------
QAR_ARMS = ("lora", "name_prompt", "qar_nocon", "qar_nocluster", "qar")


def _qar_log(quiet: bool):
    import sys

    return (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))


@app.command("qar-bench")
def qar_bench(quick: bool = typer.Option(False, "--quick", help="Plays only, 20 steps, 160 training / 40 held-out."),
              json_out: bool = typer.Option(False, "--json", help="Print one JSON object (contract keys)."),
              seed: int = typer.Option(0, "--seed", help="First training seed."),
              seeds: int = typer.Option(1, "--seeds", min=1, max=5, help="Number of seeds (seed, seed+1, ...)."),
              corpus: list[str] = typer.Option(None, "--corpus", help="plays and/or chat (default both)."),
              steps: int = typer.Option(None, "--steps", min=1, help="Training steps per arm (default 100; quick 20)."),
              threads: int = typer.Option(1, "--threads", min=1, max=64, help="torch threads."),
              out: str = typer.Option(None, "--out", help="Write questioner_aware.{json,md,png} into this directory."),
              ) -> None:
    """The six arms (base, LoRA, name-in-prompt LoRA, QAR without contrastive, without clustering, QAR) on held-out
    exchanges: ROUGE-L, BLEU-1..4, paired bootstrap, questioner probe."""
    import torch

    from edgecloud.personal.qar.bench import BenchConfig, run_corpus, summarize
    from edgecloud.results import check_out_dir, report

    if out:
        check_out_dir(out)
    torch.set_num_threads(threads)
    kw = {"seeds": tuple(range(seed, seed + seeds))}
    if corpus:
        kw["corpora"] = tuple(corpus)
    if steps:
        kw["steps"] = steps
    bc = BenchConfig.quick(**kw) if quick else BenchConfig(**kw)
    log = _qar_log(False)
    runs = [run_corpus(c, bc, log) for c in bc.corpora]
    data = summarize(runs, bc)
    if out:
        from edgecloud.personal.qar.bench import write_results

        write_results(data, out, seed)
    if json_out:
        print(report(data, seed=seed))
    else:
        for k in ("rougeL_base", "rougeL_lora", "rougeL_name_prompt", "rougeL_qar_nocon", "rougeL_qar_nocluster",
                  "rougeL_qar", "rel_gain_vs_lora", "rel_gain_vs_name_prompt", "p_vs_lora", "p_vs_name_prompt",
                  "questioners", "responders"):
            print(f"{k}: {data[k]:.4f}" if isinstance(data[k], float) else f"{k}: {data[k]}")


@app.command("qar-train")
def qar_train(corpus: str = typer.Option("plays", "--corpus", help="plays or chat."),
              arm: str = typer.Option("qar", "--arm", help=f"One of {', '.join(QAR_ARMS)}."),
              steps: int = typer.Option(30, "--steps", min=1, help="Training steps (batch 8)."),
              seed: int = typer.Option(0, "--seed", help="Training seed."),
              max_train: int = typer.Option(240, "--max-train", min=8, help="Training exchanges kept."),
              threads: int = typer.Option(1, "--threads", min=1, max=64, help="torch threads."),
              out: str = typer.Option(None, "--out", help="Checkpoint file (default: cache_root()/qar/<corpus>-"
                                                          "<arm>-seed<seed>.safetensors); an unfinished one resumes."),
              json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
              quiet: bool = typer.Option(False, "--quiet", help="No progress lines.")) -> None:
    """Train one arm on one corpus and save a safetensors checkpoint (resumes a partial one)."""
    import torch

    from edgecloud.errors import UserError
    from edgecloud.personal.qar.respond import default_checkpoint, train_checkpoint
    from edgecloud.results import check_out_file, report

    if arm not in QAR_ARMS:
        raise UserError(f"--arm {arm!r}: choose one of {', '.join(QAR_ARMS)}")
    from pathlib import Path

    path = check_out_file(out) if out else default_checkpoint(corpus, arm, seed)
    torch.set_num_threads(threads)
    data = train_checkpoint(corpus, arm, steps, seed, Path(path), max_train=max_train, log=_qar_log(quiet))
    if json_out:
        print(report(data, seed=seed))
    else:
        for k, v in data.items():
            print(f"{k}: {v}")


@app.command("respond")
def respond_cmd(line: str = typer.Argument(..., help="The questioner's line."),
                responder: str = typer.Option(..., "--responder", help="Who answers (e.g. 'Hamlet')."),
                questioner: str = typer.Option(..., "--questioner", help="Who asks (e.g. 'Horatio (hamlet)')."),
                corpus: str = typer.Option("plays", "--corpus", help="Which trained corpus (for the default path)."),
                checkpoint: str = typer.Option(None, "--checkpoint", help="A qar-train checkpoint (default: the "
                                                                          "cached QAR one for --corpus, seed 0)."),
                model: str = typer.Option(None, "--model", help="Base model (default: the checkpoint's)."),
                max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, max=256),
                json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Answer a line as RESPONDER to QUESTIONER with a trained questioner-aware model."""
    from pathlib import Path

    import torch

    from edgecloud.personal.qar.respond import default_checkpoint, respond
    from edgecloud.results import report

    torch.set_num_threads(1)
    path = Path(checkpoint) if checkpoint else default_checkpoint(corpus)
    data = respond(line, responder, questioner, path, model, max_new_tokens)
    if json_out:
        print(report(data))
    else:
        print(f"{data['responder']} (to {data['questioner']}): {data['reply']}")
