"""Task head for classification tasks: the label from one forward pass on the last hidden state.

Decoding a label costs a prefill plus one decode step per label token (and the stop token); a linear head on the
prompt's last hidden state (base + the task's adapter, through the same LoRA layers the server uses) costs the
prefill alone. The head is a multinomial logistic regression fitted on the training split's features (full-batch
L-BFGS, seeded, L2), stored as safetensors next to the adapter with its labels in the metadata.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgecloud.lora.tasks import Example


@torch.inference_mode()
def features(engine, lora, adapter: str | None, exs: list[Example], batch: int = 16) -> torch.Tensor:
    """(n, hidden) final-norm hidden state at each prompt's last token, right-padded batches (causal: padding
    after the last token cannot change it)."""
    lora.default = adapter
    out = []
    for s in range(0, len(exs), batch):
        ids = [engine.encode(e.prompt) for e in exs[s:s + batch]]
        w = max(map(len, ids))
        x = torch.tensor([i + [0] * (w - len(i)) for i in ids])
        att = torch.tensor([[1] * len(i) + [0] * (w - len(i)) for i in ids])
        h = engine.decoder(input_ids=x, attention_mask=att).last_hidden_state
        out.append(h[torch.arange(len(ids)), torch.tensor([len(i) - 1 for i in ids])].float())
    lora.default = None
    return torch.cat(out)


class Head:
    def __init__(self, W: torch.Tensor, b: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor, labels: list[str]):
        self.W, self.b, self.mu, self.sd, self.labels = W, b, mu, sd, labels

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return ((h - self.mu) / self.sd) @ self.W + self.b

    def predict(self, h: torch.Tensor) -> list[str]:
        return [self.labels[i] for i in self.logits(h).argmax(-1).tolist()]

    def save(self, path: Path) -> None:
        from edgecloud.atomic import atomic_path

        with atomic_path(Path(path)) as tmp:
            save_file({"W": self.W, "b": self.b, "mu": self.mu, "sd": self.sd}, str(tmp),
                      metadata={"labels": json.dumps(self.labels)})

    @classmethod
    def load(cls, path: Path) -> Head:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            labels = json.loads(f.metadata()["labels"])
        t = load_file(str(path))
        return cls(t["W"], t["b"], t["mu"], t["sd"], labels)


def fit(h: torch.Tensor, y: list[str], labels: list[str], l2: float = 1e-2, iters: int = 200, seed: int = 0) -> Head:
    torch.manual_seed(seed)
    mu, sd = h.mean(0), h.std(0) + 1e-6
    z = (h - mu) / sd
    t = torch.tensor([labels.index(v) for v in y])
    W = torch.zeros(h.shape[1], len(labels), requires_grad=True)
    b = torch.zeros(len(labels), requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ W + b, t) + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Head(W.detach(), b.detach(), mu, sd, labels)


@torch.inference_mode()
def compare(engine, lora, adapter: str | None, head: Head, exs: list[Example], max_new_tokens: int = 8) -> dict:
    """Accuracy and per-request latency (batch 1) of the head vs decoding the label, on the same examples."""
    from edgecloud.llm.batch import generate_batch
    from edgecloud.lora.tasks import score

    hits_h = hits_d = 0.0
    t_h = t_d = 0.0
    for e in exs:
        t = time.perf_counter()
        hits_h += head.predict(features(engine, lora, adapter, [e]))[0] == e.answer
        t_h += time.perf_counter() - t
        lora.seq_adapter = {0: adapter}
        t = time.perf_counter()
        out = generate_batch(engine, [engine.encode(e.prompt)], max_new_tokens)[0]
        t_d += time.perf_counter() - t
        hits_d += score(out.text, e)
    n = len(exs)
    return {"head_accuracy": hits_h / n, "decode_accuracy": hits_d / n, "head_latency_ms": 1e3 * t_h / n,
            "decode_latency_ms": 1e3 * t_d / n, "n": n}
