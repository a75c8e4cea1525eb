"""Short CPU LoRA training with peft (loss on answer tokens only), saved in peft format; evaluation through the
serving path (batched engine + ATMM), so the accuracy we report is the accuracy the server delivers."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgecloud.errors import UserError
from edgecloud.lora.tasks import Example, examples, score


@dataclass
class TrainConfig:
    tasks: tuple[str, ...] = ("arith",)
    rank: int = 4
    alpha: int = 8
    lr: float = 2e-3
    steps: int = 120
    batch: int = 8
    train_examples: int = 400
    test_examples: int = 40
    max_new_tokens: int = 12
    checkpoint_every: int = 50
    seed: int = 0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        if not 1 <= self.rank <= 64:
            raise UserError(f"--rank {self.rank}: must be 1..64 (the operator's supported ranks)")
        if self.steps < 1 or self.batch < 1 or self.test_examples < 1:
            raise UserError("--steps, --batch and --test must be ≥ 1")


def _encode(tok, ex: Example, eos: int) -> tuple[list[int], list[int]]:
    p = tok(ex.prompt, add_special_tokens=False)["input_ids"]
    a = tok(" " + ex.answer, add_special_tokens=False)["input_ids"] + [eos]
    return p + a, [-100] * len(p) + a


def _save_peft(peft_model, out: Path, base: str, opt=None, step: int | None = None, extra=None) -> None:
    """peft's own save (adapter_config.json + adapter_model.safetensors), our base name, atomically (temp dir
    then rename); a checkpoint also keeps the AdamW moments (safetensors) and its step, so training resumes."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp))
    cfg_p = tmp / "adapter_config.json"
    cfg = json.loads(cfg_p.read_text())
    cfg["base_model_name_or_path"] = base
    cfg_p.write_text(json.dumps(cfg, indent=1))
    if opt is not None:
        st = opt.state_dict()
        save_file({f"{i}.{k}": v.contiguous() for i, s in st["state"].items() for k, v in s.items()},
                  str(tmp / "optimizer.safetensors"))
        (tmp / "train_state.json").write_text(json.dumps({"step": step, **(extra or {})}))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _latest_checkpoint(out: Path) -> tuple[int, Path | None]:
    cks = sorted((int(c.name.split("-")[1]), c) for c in out.glob("checkpoint-*")
                 if (c / "train_state.json").is_file() and c.name.split("-")[1].isdigit())
    return cks[-1] if cks else (0, None)


def answer_loss(model, ids, att, lab) -> torch.Tensor:
    """Cross-entropy on answer tokens only, with the LM head applied to those positions alone: the head's
    (576 x 49,152) matmul and softmax over every prompt position is most of a short step's cost and has no loss."""
    inner = model.get_base_model()
    h = inner.model(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1]
    tgt = lab[:, 1:]
    keep = tgt != -100
    return torch.nn.functional.cross_entropy(inner.lm_head(h[keep]).float(), tgt[keep])


def train(cfg: TrainConfig, out: Path, base: str = "smollm2-135m", init: Path | None = None, log=print,
          lm=None) -> dict:
    """Train one adapter on the union of ``cfg.tasks`` (``init``: warm start from a peft adapter dir). Resumes
    from the newest ``out/checkpoint-<step>`` (weights, AdamW state, step; the data order is replayed).
    ``lm``: an already loaded :class:`~edgecloud.llm.models.LoadedModel` (tests); default ``load_model(base)``."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from edgecloud.llm.models import load_model

    torch.manual_seed(cfg.seed)
    lm = lm or load_model(base)
    tok = lm.tokenizer
    eos = tok.eos_token_id
    start, ck = _latest_checkpoint(out)
    src = ck or init
    if src is not None:
        model = PeftModel.from_pretrained(lm.model, str(src), is_trainable=True)
    else:
        model = get_peft_model(lm.model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                    target_modules=list(cfg.targets), task_type="CAUSAL_LM"))
    model.train()
    data = [_encode(tok, ex, eos) for t in cfg.tasks
            for ex in examples(t, "train", cfg.train_examples // len(cfg.tasks), cfg.seed)]
    rng = random.Random(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    if ck is not None:
        st = load_file(str(ck / "optimizer.safetensors"))
        for i, p in enumerate(params):
            opt.state[p] = {k: st[f"{i}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
        log(f"resumed from {ck} (step {start})")
    prev = json.loads((ck / "train_state.json").read_text()) if ck is not None else {}
    t0 = time.perf_counter() - prev.get("elapsed_s", 0.0)  # training time counts across resumes
    losses = list(prev.get("losses_tail", []))
    for step in range(1, cfg.steps + 1):
        b = rng.sample(data, min(cfg.batch, len(data)))
        if step <= start:
            continue  # replay the sampler so a resumed run sees the same batches
        w = max(len(x) for x, _ in b)
        ids = torch.tensor([x + [eos] * (w - len(x)) for x, _ in b])
        lab = torch.tensor([y + [-100] * (w - len(y)) for _, y in b])
        att = torch.tensor([[1] * len(x) + [0] * (w - len(x)) for x, _ in b])
        loss = answer_loss(model, ids, att, lab)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            log(f"step {step} loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            out.mkdir(parents=True, exist_ok=True)
            _save_peft(model, out / f"checkpoint-{step}", base, opt, step,
                       {"elapsed_s": time.perf_counter() - t0, "losses_tail": losses[-10:]})
            for old in out.glob("checkpoint-*"):
                if old.name != f"checkpoint-{step}":
                    shutil.rmtree(old, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_peft(model, out, base)
    info = {"config": asdict(cfg), "init": str(init) if init else None, "resumed_at": start,
            "elapsed_in_checkpoints": "elapsed_s" in prev,
            "train_s": time.perf_counter() - t0, "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:]))}
    (out / "train.json").write_text(json.dumps(info, indent=1))
    return info


def evaluate(engine, lora, adapter: str | None, task: str, n: int, seed: int = 0, max_new_tokens: int = 12,
             batch: int = 32) -> float:
    """Exact match on the held-out split, greedy, through the batched engine with per-request adapters."""
    from edgecloud.llm.batch import generate_batch

    exs = examples(task, "test", n, seed)
    hits = 0.0
    for s in range(0, n, batch):
        chunk = exs[s:s + batch]
        lora.seq_adapter = {i: adapter for i in range(len(chunk))}
        outs = generate_batch(engine, [engine.encode(e.prompt) for e in chunk], max_new_tokens)
        hits += sum(score(o.text, e) for o, e in zip(outs, chunk))
    return hits / n
