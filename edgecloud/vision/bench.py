"""The SAM-COD benchmark: six methods on generated RGB-D camouflage scenes, plus the real RGB-D photo and stereo pair.

The headline rows use box mode (all methods get the same jittered box prompt); a second set of rows runs without a
prompt (``prompt="none"``). All trained methods get the same steps, batch and seed. Depth is estimated by block
matching from a rendered stereo pair (``data.stereo_depth``) unless ``depth="clean"``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from edgecloud.errors import UserError
from edgecloud.vision.data import DEPTH_MODES, Sample, synthetic_split
from edgecloud.vision.samcod import CODConfig
from edgecloud.vision.train import cod_metrics, predict, train

# (variant, distill, prompt, label): the six box-mode rows of the issue, then the no-prompt rows
METHODS = [("zeroshot", True, "box", "zero-shot SAM + box"), ("rgb", True, "box", "RGB-only adapter"),
           ("depth", True, "box", "depth-only adapter"), ("early", True, "box", "early fusion (4-channel)"),
           ("samcod", False, "box", "SAM-COD without distillation"), ("samcod", True, "box", "SAM-COD")]
NO_PROMPT_METHODS = [("zeroshot", True, "none", "zero-shot SAM, no prompt"),
                     ("rgb", True, "none", "RGB-only adapter, no prompt"),
                     ("samcod", True, "none", "SAM-COD, no prompt")]


@dataclass
class BenchConfig:
    n_train: int = 32
    n_test: int = 24
    steps: int = 24
    batch: int = 2
    img_size: int = 128
    seed: int = 0
    depth: str = "stereo"      # "stereo" (estimated from a rendered pair) or "clean" (the generator's nearness)
    no_prompt: bool = True     # also run NO_PROMPT_METHODS

    def __post_init__(self):
        if self.depth not in DEPTH_MODES:
            raise UserError(f"depth {self.depth!r}: choose one of {', '.join(DEPTH_MODES)}")

    @classmethod
    def quick(cls, seed: int = 0, depth: str = "stereo") -> BenchConfig:
        return cls(n_train=8, n_test=8, steps=6, batch=1, img_size=96, seed=seed, depth=depth)

    def methods(self):
        return METHODS + (NO_PROMPT_METHODS if self.no_prompt else [])


def method_key(variant: str, distill: bool, prompt: str = "box") -> str:
    key = variant if distill or variant != "samcod" else "samcod_nodistill"
    return key if prompt == "box" else f"{key}_noprompt"


def real_rgbd_sample(size: int) -> Sample:
    """imgaug's quokka photo with its annotated polygon mask and its depth map (MIT licence, imgaug)."""
    import json
    from importlib.util import find_spec
    from pathlib import Path

    from PIL import Image, ImageDraw
    from skimage.transform import resize

    from edgecloud.vision.data import check_depth, jitter_box

    root = Path(find_spec("imgaug").origin).parent
    img = Image.open(root / "quokka.jpg").convert("RGB")
    poly = json.loads((root / "quokka_annotations.json").read_text())["polygons"][0]["keypoints"]
    mask = Image.new("L", img.size)
    ImageDraw.Draw(mask).polygon([(p["x"], p["y"]) for p in poly], fill=1)
    depth = np.asarray(Image.open(root / "quokka_depth_map_halfres.png").convert("F"), dtype=np.float64)
    rs = lambda a, o: resize(np.asarray(a, dtype=np.float32), (size, size), order=o, anti_aliasing=o > 0)  # noqa: E731
    m = rs(mask, 0) > 0.5
    d = rs(check_depth(depth, "quokka depth"), 1).astype(np.float32)
    return Sample((rs(img, 1) / 255).astype(np.float32), d, m, jitter_box(m, np.random.default_rng(0)), "quokka")


def stereo_check() -> dict:
    """Block matching on the Middlebury motorcycle pair (half resolution) vs its ground-truth disparity."""
    from skimage import data
    from skimage.transform import rescale

    from edgecloud.vision.stereo import block_matching, disparity_error

    left, right, disp = data.stereo_motorcycle()
    L, R = (rescale(x / 255.0, 0.5, channel_axis=-1, anti_aliasing=True) for x in (left, right))
    t = time.time()
    pred = block_matching(L, R, max_disp=64, window=9)
    gt = disp[::2, ::2][:pred.shape[0], :pred.shape[1]] / 2
    return {**disparity_error(pred, gt), "seconds": round(time.time() - t, 2), "size": list(pred.shape)}


def stereo_stats(samples: list[Sample]) -> dict:
    """The stereo depth's error on generated scenes (vs their true disparity), to compare with Middlebury's."""
    keys = ("epe_px", "bad2_pct", "boundary_epe_px")
    return {**{k: float(np.mean([s.info[k] for s in samples])) for k in keys}, "scenes": len(samples)}


def run(cfg: BenchConfig, progress=None, show_progress: bool = False) -> dict:
    torch.manual_seed(cfg.seed)
    from edgecloud.vision.sam import load_sam

    sam = load_sam(cfg.img_size)
    train_set = synthetic_split("train", cfg.n_train, cfg.seed, cfg.img_size, cfg.depth)
    test_set = synthetic_split("test", cfg.n_test, cfg.seed, cfg.img_size, cfg.depth)
    real = real_rgbd_sample(cfg.img_size)
    rows, preds, logs = [], {}, {}
    methods = cfg.methods()
    for i, (variant, distill, prompt, label) in enumerate(methods):
        mc = CODConfig(variant=variant, distill=distill, prompt=prompt, img_size=cfg.img_size, steps=cfg.steps,
                       batch=cfg.batch, seed=cfg.seed)
        t, cpu = time.time(), time.process_time()
        model, log = train(mc, train_set, sam=copy.deepcopy(sam), show_progress=show_progress)
        train_s, train_cpu_s = time.time() - t, time.process_time() - cpu  # CPU s ~ a quiet core's wall time
        key = method_key(variant, distill, prompt)
        p = predict(model, test_set)
        preds[key] = p
        m = cod_metrics(p, [s.mask for s in test_set])
        real_m = cod_metrics(predict(model, [real]), [real.mask])
        rows.append({"method": label, "key": key, "prompt": prompt, **m, "train_s": round(train_s, 1),
                     "train_cpu_s": round(train_cpu_s, 1),
                     "quokka_s_alpha": real_m["s_alpha"], "quokka_mae": real_m["mae"]})
        logs[key] = [log[0]["loss"], log[-1]["loss"]] if log else None
        if progress:
            progress(i + 1, len(methods))
    by = {r["key"]: r for r in rows}
    out = {
        "s_alpha_rgb_adapter": by["rgb"]["s_alpha"], "s_alpha_samcod": by["samcod"]["s_alpha"],
        "mae_rgb_adapter": by["rgb"]["mae"], "mae_samcod": by["samcod"]["mae"],
        "s_alpha_gain_vs_rgb": by["samcod"]["s_alpha"] - by["rgb"]["s_alpha"],
        "distillation_share_s_alpha": by["samcod"]["s_alpha"] - by["samcod_nodistill"]["s_alpha"],
        "images": cfg.n_test, "train_images": cfg.n_train, "prompt": "box (object box jittered by up to 10%)",
        "depth": cfg.depth, "rows": rows, "loss_first_last": logs, "stereo_middlebury": stereo_check(),
        "config": asdict(cfg),
    }
    if "samcod_noprompt" in by:
        out.update(s_alpha_samcod_noprompt=by["samcod_noprompt"]["s_alpha"],
                   s_alpha_rgb_adapter_noprompt=by["rgb_noprompt"]["s_alpha"],
                   mae_samcod_noprompt=by["samcod_noprompt"]["mae"], mae_rgb_adapter_noprompt=by["rgb_noprompt"]["mae"])
    if cfg.depth == "stereo":
        out["stereo_generated"] = stereo_stats(train_set + test_set)
    out["_preds"] = preds
    out["_test"] = test_set
    return out


def grid_figure(out: dict, n: int = 4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test, preds = out["_test"][:n], out["_preds"]
    cols = ["image", "depth", "truth", *preds]
    fig, axes = plt.subplots(len(test), len(cols), figsize=(1.6 * len(cols), 1.6 * len(test)))
    for r, s in enumerate(test):
        ims = [s.rgb, s.depth, s.mask, *(preds[k][r] for k in preds)]
        for c, (name, im) in enumerate(zip(cols, ims)):
            ax = axes[r, c]
            ax.imshow(im, cmap=None if im.ndim == 3 else "gray", vmin=0, vmax=1)
            if c == 0:
                x0, y0, x1, y1 = s.box
                ax.add_patch(matplotlib.patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="y", lw=0.8))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=7)
    fig.tight_layout()
    return fig


def public(out: dict) -> dict:
    return {k: v for k, v in out.items() if not k.startswith("_")}
