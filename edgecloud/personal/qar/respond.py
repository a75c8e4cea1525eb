"""Answering with a trained checkpoint (``edgecloud personal respond``) and training one (``qar-train``).

A checkpoint is self-describing (configs, pairs, base fingerprint in its metadata), so answering needs only it and
the base model. Names are matched case-insensitively, and may be given without the play in brackets or as a
unique part of the name ("hamlet" for "Hamlet (hamlet)", "polonius" for "Lord Polonius (hamlet)").
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from edgecloud.errors import UserError
from edgecloud.paths import cache_root


def default_checkpoint(corpus: str, arm: str = "qar", seed: int = 0) -> Path:
    return cache_root() / "qar" / f"{corpus}-{arm}-seed{seed}.safetensors"


def match_name(given: str, valid: list[str], what: str, flag: str) -> str:
    g = given.strip().lower()
    exact = [v for v in valid if v.lower() == g]
    if exact:
        return exact[0]
    short = [v for v in valid if v.lower().split(" (")[0] == g]
    if len(short) == 1:
        return short[0]
    part = [v for v in valid if g and g in v.lower().split(" (")[0]]  # "polonius" for "Lord Polonius (hamlet)"
    if len(part) == 1:
        return part[0]
    raise UserError(f"{flag} {given!r}: unknown {what}; valid: {', '.join(valid)}")


def train_checkpoint(corpus: str, arm: str, steps: int, seed: int, out: Path, max_train: int = 240,
                     base: str = "smollm2-135m", top_layers: int = 3, log=print) -> dict:
    """Build the corpus, cluster, train one arm and save (resuming a partial checkpoint at ``out``)."""
    from edgecloud.llm.models import load_model
    from edgecloud.personal.qar.bench import BenchConfig, arm_configs
    from edgecloud.personal.qar.clusters import assign
    from edgecloud.personal.qar.exchanges import DataConfig, build
    from edgecloud.personal.qar.model import DualTower
    from edgecloud.personal.qar.train import train

    if arm == "base":
        raise UserError("--arm base has nothing to train; choose lora, name_prompt, qar_nocon, qar_nocluster or qar")
    dc = DataConfig(corpus=corpus, max_train=max_train)
    ds = build(dc)
    bc = BenchConfig(corpora=(corpus,), steps=steps, top_layers=top_layers, base=base, max_train=max_train)
    ks = assign(ds) if arm != "qar_nocluster" else {r: 1 for r in ds.responders}
    mc, tc = arm_configs(arm, bc, len(ds.pairs), sum(ks.values()), seed)
    tset = ds.train
    if not tc.clustered:
        idx = {r: i for i, r in enumerate(ds.responders)}
        from dataclasses import replace

        tset = [replace(e, cluster=idx[e.responder]) for e in ds.train]
    model = DualTower(load_model(base), mc)
    meta = {"corpus": corpus, "arm": arm, "pairs": [list(p) for p in ds.pairs], "responders": ds.responders,
            "data_config": asdict(dc), "clusters": ks}
    info = train(model, tset, tc, ckpt=out, meta=meta, log=log)
    return {"checkpoint": str(out), "corpus": corpus, "arm": arm, **ds.counts(), **info}


def respond(line: str, responder: str, questioner: str, checkpoint: Path, model_name: str | None = None,
            max_new_tokens: int = 24) -> dict:
    from edgecloud.llm.models import load_model
    from edgecloud.personal.qar.exchanges import Exchange, prompt_text
    from edgecloud.personal.qar.model import DualTower, ModelConfig
    from edgecloud.personal.qar.train import check_base, load_params, read_checkpoint

    if not line.strip():
        raise UserError("LINE: give the questioner's line to answer (it is empty)")
    if not checkpoint.exists():
        raise UserError(f"no trained checkpoint at {checkpoint}; run `edgecloud personal qar-train` first "
                        "(or pass --checkpoint)")
    tensors, meta = read_checkpoint(checkpoint)
    pairs = [tuple(p) for p in meta["pairs"]]
    responders = sorted({r for r, _ in pairs})
    r = match_name(responder, responders, "responder", "--responder")
    qs = sorted(q for rr, q in pairs if rr == r)
    q = match_name(questioner, qs, f"questioner for {r}", "--questioner")
    mc = ModelConfig.from_dict(meta["model_config"])
    lm = load_model(model_name or mc.base)
    check_base(meta, lm.fingerprint, checkpoint)
    model = DualTower(lm, mc)
    load_params(model, tensors, checkpoint)
    model.eval()
    named = meta.get("train_config", {}).get("named", True)
    ex = Exchange(r, q, " ".join(line.split()), "", pair=pairs.index((r, q)))
    ids = model.tok(prompt_text(ex, named))["input_ids"]
    out = model.generate([ids], [ex.pair], max_new_tokens)[0]
    return {"responder": r, "questioner": q, "line": ex.question,
            "reply": model.tok.decode(out, skip_special_tokens=True).strip(), "checkpoint": str(checkpoint),
            "arm": meta.get("arm"), "step": int(meta["step"])}
