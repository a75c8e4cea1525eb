"""Training (resumable, safetensors checkpoints), prediction and the four COD metrics (pysodmetrics)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from edgecloud.errors import UserError
from edgecloud.progress import progress_bar
from edgecloud.vision.data import Sample
from edgecloud.vision.samcod import SAMCOD, CODConfig

ARCH = "samcod-litemedsam-tinyvit"


def to_batch(samples: list[Sample]):
    rgb = torch.tensor(np.stack([s.rgb for s in samples])).permute(0, 3, 1, 2).contiguous()
    depth = torch.tensor(np.stack([s.depth for s in samples]))[:, None]
    mask = torch.tensor(np.stack([s.mask for s in samples]), dtype=torch.float32)[:, None]
    box = torch.tensor(np.stack([s.box for s in samples]))
    return rgb, depth, mask, box


def save_checkpoint(model: SAMCOD, opt, step: int, path: Path) -> None:
    from safetensors.torch import save_file

    from edgecloud.atomic import atomic_path

    tensors = {f"model.{k}": v for k, v in model.trained_state().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = v.detach().reshape(-1).clone() if v.ndim == 0 else v.detach().contiguous()
    meta = {"arch": ARCH, "config": json.dumps(model.cfg.to_dict()), "step": str(step)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], int]:
    """(config dict, tensors, step); a file that is not our architecture is one clear error."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--checkpoint {p}: no such file")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        raise UserError(f"--checkpoint {p}: not a safetensors checkpoint ({type(e).__name__})") from e
    if meta.get("arch") != ARCH:
        raise UserError(f"--checkpoint {p}: written for architecture {meta.get('arch')!r}, not {ARCH!r}; "
                        "give a checkpoint from `edgecloud vision train`")
    return json.loads(meta["config"]), tensors, int(meta.get("step", 0))


def load_model(path: str | Path, sam=None) -> SAMCOD:
    cfg, tensors, _ = read_checkpoint(path)
    model = SAMCOD(CODConfig(**cfg), sam)
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    want = set(model.trained_state())
    if set(state) != want:
        raise UserError(f"--checkpoint {path}: its tensors do not match the {cfg['variant']} model; "
                        "retrain with this version")
    model.load_state_dict(state, strict=False)
    return model.eval()


def train(cfg: CODConfig, samples: list[Sample], ckpt: Path | None = None, every: int = 20, sam=None,
          show_progress: bool = True, resume: bool = True) -> tuple[SAMCOD, list[dict]]:
    """Train on ``samples``; with ``ckpt`` saves every ``every`` steps and resumes from it if present."""
    torch.manual_seed(cfg.seed)
    model = SAMCOD(cfg, sam)
    log: list[dict] = []
    if cfg.variant == "zeroshot":
        return model.eval(), log
    opt = torch.optim.AdamW(model.param_groups(), weight_decay=0.0)
    start = 0
    if ckpt is not None and resume and Path(ckpt).exists():
        saved_cfg, tensors, start = read_checkpoint(ckpt)
        if {**saved_cfg, "steps": cfg.steps} != cfg.to_dict():  # more steps = continue training; nothing else
            raise UserError(f"--out {ckpt}: saved with another config; use a new path or the same options")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
        _ = opt.state_dict()
        params = [p for g in opt.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
            if st:
                st["step"] = st["step"].reshape(())
                opt.state[p] = st
    rng = np.random.default_rng(cfg.seed)
    order = [int(i) for _ in range(cfg.steps * cfg.batch // max(len(samples), 1) + 2)
             for i in rng.permutation(len(samples))]
    model.train()
    with progress_bar(f"train {cfg.variant}", show_progress) as update:
        for step in range(start, cfg.steps):
            idx = order[step * cfg.batch:(step + 1) * cfg.batch]
            rgb, depth, mask, box = to_batch([samples[i] for i in idx])
            out = model(rgb, depth, box)
            loss, parts = model.loss(out, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            log.append({"step": step + 1, "loss": float(loss.detach()), **parts})
            update(step + 1, cfg.steps)
            if ckpt is not None and ((step + 1) % every == 0 or step + 1 == cfg.steps):
                save_checkpoint(model, opt, step + 1, Path(ckpt))
    return model.eval(), log


@torch.no_grad()
def predict(model: SAMCOD, samples: list[Sample], batch: int = 4) -> list[np.ndarray]:
    """Probability maps (H, W) in [0, 1]."""
    model.eval()
    out = []
    for i in range(0, len(samples), batch):
        rgb, depth, _, box = to_batch(samples[i:i + batch])
        out += list(model(rgb, depth, box)["logits"].sigmoid()[:, 0].numpy())
    return out


def cod_metrics(preds: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    """S_alpha, mean E_phi, weighted F_beta and MAE (pysodmetrics, the COD benchmarks' own toolkit)."""
    import py_sod_metrics as M

    sm, em, wfm, mae = M.Smeasure(), M.Emeasure(), M.WeightedFmeasure(), M.MAE()
    for p, m in zip(preds, masks):
        pred = np.clip(np.round(p * 255), 0, 255).astype(np.uint8)
        gt = (m > 0).astype(np.uint8) * 255
        for metric in (sm, em, wfm, mae):
            metric.step(pred=pred, gt=gt)
    return {"s_alpha": float(sm.get_results()["sm"]), "e_phi": float(em.get_results()["em"]["curve"].mean()),
            "wf_beta": float(wfm.get_results()["wfm"]), "mae": float(mae.get_results()["mae"])}
