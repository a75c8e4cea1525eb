"""``edgecloud vision``: SAM-COD camouflaged object detection from RGB-D. torch is imported inside the commands."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from edgecloud.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n or int(os.environ.get("EDGECLOUD_THREADS", "1")))


@app.command("cod-bench")
def cod_bench(
    quick: bool = typer.Option(False, "--quick", help="8 train / 8 test images at 96 px, 6 steps: minutes"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    seed: int = typer.Option(0, "--seed"),
    out: Path | None = typer.Option(None, "--out", help="also write sam_cod.{json,md,png} into this directory"),
    threads: int = typer.Option(0, "--threads", min=0, help="torch threads (0: EDGECLOUD_THREADS or 1)"),
    clean_depth: bool = typer.Option(False, "--clean-depth", help="the generator's noise-free depth instead of "
                                                                  "block-matching stereo on rendered pairs"),
    no_prompt_rows: bool = typer.Option(True, "--no-prompt-rows/--box-only", help="also measure no-prompt mode"),
) -> None:
    """Zero-shot SAM, RGB / depth adapters, early fusion, SAM-COD with and without distillation (box prompts;
    no-prompt rows beside them)."""
    import time

    from edgecloud.results import Result, check_out_dir, report
    from edgecloud.vision.bench import BenchConfig, public, run

    if out is not None:
        check_out_dir(out)
    _threads(threads)
    started = time.time()
    depth = "clean" if clean_depth else "stereo"
    cfg = BenchConfig.quick(seed, depth) if quick else BenchConfig(seed=seed, depth=depth)
    cfg.no_prompt = no_prompt_rows
    res = run(cfg, show_progress=not as_json)
    if out is not None:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
        from sam_cod import write
        write(res, cfg, out, started)
    data = public(res)
    if as_json:
        print(report(data, seed=seed))
        return
    print(Result("sam_cod", data).table(data["rows"], ["method", "prompt", "s_alpha", "e_phi", "wf_beta", "mae",
                                                        "train_s"]))


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="checkpoint file (.safetensors); resumed if it exists"),
    variant: str = typer.Option("samcod", "--variant", help="rgb | depth | early | samcod"),
    no_distill: bool = typer.Option(False, "--no-distill", help="drop the model and modal distillers"),
    data: Path | None = typer.Option(None, "--data", help="a COD10K/NC4K/CAMO-style folder (Imgs/, GT/, Depth/); "
                                                          "default: generated RGB-D camouflage scenes"),
    images: int = typer.Option(48, "--images", min=1, help="training images (generated, or the first N of --data)"),
    steps: int = typer.Option(60, "--steps", min=1),
    batch: int = typer.Option(2, "--batch", min=1),
    img_size: int = typer.Option(128, "--img-size", help="encoder input side, multiple of 32 (256 = SAM's own)"),
    prompt: str = typer.Option("box", "--prompt", help="box | none"),
    clean_depth: bool = typer.Option(False, "--clean-depth", help="generated scenes with noise-free depth "
                                                                  "(default: depth by stereo block matching)"),
    every: int = typer.Option(20, "--every", min=1, help="checkpoint every N steps"),
    sam_checkpoint: Path | None = typer.Option(None, "--sam-checkpoint", help="an official SAM ViT-B/L/H checkpoint "
                                               "(e.g. sam_vit_b_01ec64.pth; none ships offline) instead of LiteMedSAM"),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(0, "--threads", min=0),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Train adapters + decoder(s) on frozen SAM; safetensors checkpoints, resumable."""
    from edgecloud.results import check_out_file, report
    from edgecloud.vision import train as T
    from edgecloud.vision.data import load_cod_folder, synthetic_split
    from edgecloud.vision.samcod import CODConfig

    check_out_file(out)
    if variant == "zeroshot":
        raise UserError("--variant zeroshot has nothing to train; choose rgb, depth, early or samcod")
    cfg = CODConfig(variant=variant, distill=not no_distill, img_size=img_size, prompt=prompt, steps=steps,
                    batch=batch, seed=seed, sam_checkpoint=str(sam_checkpoint or ""))
    _threads(threads)
    depth = "clean" if clean_depth else "stereo"
    samples = (load_cod_folder(data, img_size, images) if data
               else synthetic_split("train", images, seed, img_size, depth))
    _, log = T.train(cfg, samples, ckpt=out, every=every, show_progress=not as_json)
    summary = {"checkpoint": str(out), "variant": variant, "steps": steps, "images": len(samples),
               "first_loss": log[0]["loss"] if log else None, "last_loss": log[-1]["loss"] if log else None}
    print(report(summary, seed=seed) if as_json else f"trained {variant}: {summary}")


@app.command()
def cod(
    rgb: Path = typer.Option(..., "--rgb", help="RGB image (PNG/JPEG)"),
    out: Path = typer.Option(..., "--out", help="mask PNG to write"),
    depth: Path | None = typer.Option(None, "--depth", help="depth map (PNG or .npy), same size as --rgb"),
    stereo: tuple[Path, Path] | None = typer.Option(None, "--stereo", help="LEFT RIGHT rectified pair (depth by "
                                                                            "block matching; --rgb is usually LEFT)"),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="from `vision train` (default: zero-shot SAM)"),
    sam_checkpoint: Path | None = typer.Option(None, "--sam-checkpoint", help="an official SAM ViT-B/L/H checkpoint "
                                               "(e.g. sam_vit_b_01ec64.pth; none ships offline) instead of LiteMedSAM"),
    box: str | None = typer.Option(None, "--box", help="x0,y0,x1,y1 in --rgb pixels (default: the whole image)"),
    max_disp: int = typer.Option(64, "--max-disp", min=1, help="stereo search range in pixels"),
    threshold: float = typer.Option(0.5, "--threshold", min=0.0, max=1.0),
) -> None:
    """Segment the camouflaged object in one RGB-D image; writes a binary mask PNG."""
    import numpy as np
    import torch
    from PIL import Image
    from skimage.transform import resize

    from edgecloud import atomic
    from edgecloud.results import check_out_file
    from edgecloud.vision.data import Sample, check_same_size, read_depth, read_rgb

    check_out_file(out)
    if checkpoint is not None and sam_checkpoint is not None:
        raise UserError("--sam-checkpoint: a trained --checkpoint already names its SAM; give one of the two")
    if (depth is None) == (stereo is None):
        raise UserError("give exactly one of --depth DEPTH or --stereo LEFT RIGHT")
    image = read_rgb(rgb, "--rgb")
    if stereo is not None:
        from edgecloud.vision.stereo import depth_from_stereo

        left, right = read_rgb(stereo[0], "--stereo LEFT"), read_rgb(stereo[1], "--stereo RIGHT")
        check_same_size(left, right, "--stereo LEFT/RIGHT")
        d = depth_from_stereo(left, right, max_disp)
    else:
        d = read_depth(depth, "--depth")
    check_same_size(image, d, "--rgb vs depth")
    H, W = image.shape[:2]
    if box is None:
        b = np.array([0, 0, W - 1, H - 1], dtype=np.float32)
    else:
        try:
            b = np.array([float(v) for v in box.split(",")], dtype=np.float32)
        except ValueError:
            b = np.zeros(0)
        if b.shape != (4,) or not (0 <= b[0] < b[2] <= W and 0 <= b[1] < b[3] <= H):
            raise UserError(f"--box {box!r}: give x0,y0,x1,y1 inside the {W}x{H} image with x0<x1, y0<y1")
    _threads(0)
    from edgecloud.vision.samcod import SAMCOD, CODConfig
    from edgecloud.vision.train import load_model, predict

    model = (load_model(checkpoint) if checkpoint
             else SAMCOD(CODConfig(variant="zeroshot", sam_checkpoint=str(sam_checkpoint or ""))))
    S = model.cfg.img_size
    scale = np.array([S / W, S / H, S / W, S / H], dtype=np.float32)
    sample = Sample(resize(image, (S, S), order=1, anti_aliasing=True).astype(np.float32),
                    resize(d, (S, S), order=1, anti_aliasing=True).astype(np.float32),
                    np.zeros((S, S), bool), b * scale, rgb.name)
    with torch.no_grad():
        prob = predict(model, [sample])[0]
    mask = resize(prob, (H, W), order=1) > threshold
    import io

    buf = io.BytesIO()
    Image.fromarray((mask * 255).astype(np.uint8)).save(buf, format="PNG")
    atomic.write_bytes(out, buf.getvalue())
    print(f"wrote {out}: {int(mask.sum())} of {H * W} pixels ({100 * mask.mean():.1f}%) marked")
