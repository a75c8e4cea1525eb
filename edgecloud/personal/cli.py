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


# ---------------------------------------------------------------- anonymous user embeddings (issue 15)
def _anon_bench_config(quick: bool, seed: int, users: int, n_train: int, n_eval: int, epochs: float):
    from dataclasses import replace

    from edgecloud.personal.anon.bench import BenchConfig, quick_config

    cfg = quick_config(seed) if quick else BenchConfig(seeds=(seed, seed + 1, seed + 2))
    d = replace(cfg.data, **{k: v for k, v in (("users", users), ("n_train", n_train), ("n_eval", n_eval)) if v})
    c = replace(cfg.cloud, epochs=epochs) if epochs else cfg.cloud
    return replace(cfg, data=d, cloud=c)


@app.command("anon-bench")
def anon_bench(quick: bool = typer.Option(False, "--quick", help="8 users, one seed: a few minutes."),
               seed: int = typer.Option(0, help="First seed (the full run uses seed, seed+1, seed+2)."),
               json_out: bool = typer.Option(False, "--json", help="Print one JSON object (contract keys + arms)."),
               out: str = typer.Option("", help="Also write anonymous_embeddings.{json,md,png} into this directory."),
               users: int = typer.Option(0, min=0, help="Override the number of users (0: the preset's)."),
               n_train: int = typer.Option(0, min=0, help="Override training examples per user."),
               n_eval: int = typer.Option(0, min=0, help="Override held-out examples per user."),
               epochs: float = typer.Option(0.0, min=0.0, help="Override training epochs per arm.")) -> None:
    """Anonymous user embeddings: every arm (no embedding, static ID, mixture, gaussian sigma sweep) + attacker."""
    from edgecloud.personal.anon.bench import CONTRACT, run, to_result
    from edgecloud.results import check_out_dir, report

    if out:
        check_out_dir(out)
    cfg = _anon_bench_config(quick, seed, users, n_train, n_eval, epochs)
    d = run(cfg)
    if out:
        to_result(d).write(out)
    if json_out:
        keep = {k: v for k, v in d.items() if k not in ("per_seed", "config")}
        print(report(keep, seed=seed))
    else:
        print(to_result(d).markdown)
        for k in CONTRACT:
            print(f"{k}: {d[k]}")


def _anon_data(users: int, n_train: int, n_eval: int):
    from edgecloud.personal.anon.data import DataConfig

    return DataConfig(users=users, n_train=n_train, n_eval=n_eval)


def _host_port(server: str) -> tuple[str, int]:
    from edgecloud.errors import UserError

    host, _, p = server.rpartition(":")
    if not host or not p.isdigit():
        raise UserError(f"--server {server!r}: give HOST:PORT, e.g. 127.0.0.1:7710")
    return host, int(p)


_SPACE = typer.Option("style", help="Feature space: style (MiniLM of the messages, the bench's) or lm (the "
                                    "cloud LM's lower-layer features).")


def _anon_space_fingerprint(space: str, lm) -> str:
    from edgecloud.errors import UserError
    from edgecloud.personal.anon import style

    if space not in ("style", "lm"):
        raise UserError(f"--space {space!r}: choose style or lm")
    return f"{lm.fingerprint}+{style.ENCODER}" if space == "style" else lm.fingerprint


def _anon_message_features(space: str, lm, examples, cfg, n_top: int):
    """(per-message features, the basis's model fingerprint) in the chosen space."""
    from edgecloud.personal.anon import features, style

    fp = _anon_space_fingerprint(space, lm)
    if space == "style":
        return style.embed([e.reply for e in examples]), fp
    return features.message_features(lm, examples, cfg, n_top), fp


@app.command("anon-basis")
def anon_basis(out: str = typer.Option(..., help="Write the shared basis (safetensors) here."),
               users: int = typer.Option(32, min=2), n_train: int = typer.Option(32, min=2),
               dim: int = typer.Option(16, min=1, help="Embedding dimension (rank of the basis)."),
               anchors: int = typer.Option(4, min=2, help="Shared anchors of the mixture regime."),
               n_top: int = typer.Option(1, min=1, help="Trainable top layers of the cloud model."),
               space: str = _SPACE, seed: int = typer.Option(0)) -> None:
    """Cloud: fit the public basis (PCA + k-means anchors) on its pool of anonymous texts (no user labels)."""
    import os

    from edgecloud.llm.models import load_model
    from edgecloud.personal.anon import data, device
    from edgecloud.results import check_out_file

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_out_file(out)
    cfg = _anon_data(users, n_train, 1)
    chosen, _ = data.select_users(cfg)
    pool = [e for u in range(len(chosen)) for e in data.user_periods(cfg, u)[0]]  # ids dropped: just texts
    lm = load_model()
    feats, fp = _anon_message_features(space, lm, pool, cfg, n_top)
    b = device.fit_basis(feats, dim, anchors, fp, seed)
    b.save(out)
    print(f"basis {b.fingerprint()}: dim {dim}, {anchors} anchors, {len(pool)} pooled messages -> {out}")


@app.command("anon-fit")
def anon_fit(basis: str = typer.Option(..., help="The cloud's basis file."),
             user: int = typer.Option(..., min=0, help="Which device: the index among the selected users."),
             out: str = typer.Option(..., help="Write this device's distribution (safetensors) here."),
             kind: str = typer.Option("gaussian", help="gaussian (close distributions) or mixture (linearly "
                                      "dependent)."),
             sigma: float = typer.Option(0.5, min=0.0), radius: float = typer.Option(1.0, min=1e-9),
             alpha: float = typer.Option(1.0, min=0.0), users: int = typer.Option(32, min=2),
             n_train: int = typer.Option(32, min=2, help="Own training-period messages the device fits from."),
             n_top: int = typer.Option(1, min=1), space: str = _SPACE) -> None:
    """Device: fit this user's distribution from its own training-period messages (nothing leaves the device)."""
    import os

    from edgecloud.llm.models import load_model
    from edgecloud.personal.anon import data, device
    from edgecloud.results import check_out_file

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_out_file(out)
    lm = load_model()
    cfg = _anon_data(users, n_train, 1)
    own = data.user_periods(cfg, user)[0]
    b = device.Basis.load(basis, _anon_space_fingerprint(space, lm))
    d = device.fit(_anon_message_features(space, lm, own, cfg, n_top)[0], b, kind, sigma, radius, alpha)
    d.save(out)
    print(f"{kind} distribution from {len(own)} messages, sigma {sigma} -> {out}")


@app.command("anon-serve")
def anon_serve(store: str = typer.Option(..., help="Directory of the upload store (uploads.jsonl, server.log)."),
               basis: str = typer.Option(..., help="The basis file (its dimension is the embedding size)."),
               host: str = typer.Option("127.0.0.1"), port: int = typer.Option(7710, min=0, max=65535),
               cloud_model: str = typer.Option("", help="A model from anon-train: also answer score requests.")
               ) -> None:
    """Cloud: accept anonymous uploads (text + embedding, no identifier) until interrupted; with --cloud-model
    also rank candidate replies for a (context, embedding) request (personalized inference)."""
    import asyncio

    from edgecloud.personal.anon.device import Basis
    from edgecloud.personal.anon.server import AnonServer, UploadStore
    from edgecloud.results import check_out_dir

    b = Basis.load(basis)
    st = UploadStore(check_out_dir(store, "--store"))
    score = None
    if cloud_model:
        import torch

        from edgecloud.llm.models import load_model
        from edgecloud.personal.anon import cloud
        from edgecloud.personal.anon.data import DataConfig

        torch.set_num_threads(1)
        lm = load_model()
        score = cloud.scorer(cloud.load_model_file(cloud_model, lm, b.fingerprint()), lm, DataConfig())

    async def serve():
        srv = AnonServer(st, b.dim, scorer=score, host=host, port=port)
        p = await srv.start()
        print(f"anon cloud listening on {host}:{p} (dim {b.dim})", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


@app.command("anon-upload")
def anon_upload(dist: str = typer.Option(..., help="This device's distribution file."),
                basis: str = typer.Option(..., help="The cloud's basis file."),
                user: int = typer.Option(..., min=0, help="Which device's messages to upload (index)."),
                server: str = typer.Option("127.0.0.1:7710", help="HOST:PORT of anon-serve."),
                n: int = typer.Option(8, min=1, help="Held-out-period messages to upload."),
                users: int = typer.Option(32, min=2), seed: int = typer.Option(0),
                json_out: bool = typer.Option(False, "--json")) -> None:
    """Device: upload messages, each with a fresh embedding sampled from its distribution and no identifier."""
    import asyncio

    from edgecloud.personal.anon import data, device
    from edgecloud.personal.anon.server import DeviceClient
    from edgecloud.results import report

    host, port = _host_port(server)
    b = device.Basis.load(basis)
    d = device.Distribution.load(dist, b)
    msgs = data.user_periods(data.DataConfig(users=users, n_train=2, n_eval=n, min_replies=2), user)[1]

    async def go():
        c = await DeviceClient.connect(host, port, d, b, seed)
        try:
            for e in msgs:
                await c.upload(e.context, e.reply)
        finally:
            await c.close()
        return c

    c = asyncio.run(go())
    ms = [s * 1e3 for s in c.embed_s]
    out = {"uploaded": len(msgs), "embed_ms_mean": sum(ms) / len(ms), "embed_ms_max": max(ms),
           "bytes_sent": c.conn.trace.totals()["sent_bytes"]}
    print(report(out, seed=seed) if json_out else "\n".join(f"{k}: {v}" for k, v in out.items()))


@app.command("anon-train")
def anon_train(store: str = typer.Option(..., help="The upload store of anon-serve (uploads.jsonl)."),
               basis: str = typer.Option(..., help="The basis the uploads' embeddings were sampled in."),
               out: str = typer.Option(..., help="Write the trained cloud model (safetensors) here."),
               epochs: float = typer.Option(1.5, min=0.01), seed: int = typer.Option(0)) -> None:
    """Cloud: train the prefix + LoRA model on the stored (embedding, text) pairs (no user identifiers)."""
    import os
    from dataclasses import replace
    from pathlib import Path

    import torch

    from edgecloud.errors import UserError
    from edgecloud.llm.models import load_model
    from edgecloud.personal.anon import cloud, data, device, features
    from edgecloud.personal.anon.server import UploadStore
    from edgecloud.results import check_out_file

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_out_file(out)
    torch.set_num_threads(1)
    recs = UploadStore(Path(store)).records()
    if len(recs) < 2:
        raise UserError(f"--store {store}: {len(recs)} uploads; training needs at least 2")
    lm = load_model()
    for p in lm.model.parameters():
        p.requires_grad_(False)
    b = device.Basis.load(basis)
    if b.model_fingerprint.split("+")[0] != lm.fingerprint:
        raise UserError(f"{basis}: basis made for model {b.model_fingerprint}, this cloud runs {lm.fingerprint}")
    z = torch.tensor([r["embedding"] for r in recs], dtype=torch.float32)
    if z.shape[1] != b.dim:
        raise UserError(f"--store {store}: embeddings of dimension {z.shape[1]}, the basis has {b.dim}")
    dcfg, ccfg = data.DataConfig(), replace(cloud.CloudConfig(), epochs=epochs)
    train = features.pack_pairs(lm, [(r["context"], r["text"]) for r in recs], dcfg, ccfg.n_top)
    mean, std = cloud.hidden_stats(train)
    m = cloud.CloudModel(lm, ccfg, b.dim, mean, std, seed=seed)
    curve = cloud.train_model(m, train, torch.zeros(len(recs), dtype=torch.long), lambda idx, u, g: z[idx], seed,
                              cloud.vocabulary(train))
    cloud.save_model(m, out, lm.fingerprint, b.fingerprint())
    print(f"trained on {len(recs)} uploads, {curve['steps']} steps (loss {curve['loss_first10']:.3f} -> "
          f"{curve['loss_last10']:.3f}) -> {out}")
