"""RGB-D camouflage data: generated scenes from real photo textures, the COD benchmarks' folder layout, and readers.

Generated scene: background and object are two crops of the *same* real photograph texture (scikit-image data:
grass, gravel, brick, rough-wall-like rock; BSD-3 licence), so colour and texture match; the object is a smooth
random blob nearer to the camera than a tilted background plane (the depth cue SAM-COD targets). Box prompts are
the object's box jittered by up to 10% of its size. Every scene is a pure function of (split, index, seed).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecloud.errors import UserError

TEXTURES = ("grass", "gravel", "brick", "rocket", "coffee", "chelsea")
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass
class Sample:
    rgb: np.ndarray     # (H, W, 3) float32 in [0, 1]
    depth: np.ndarray   # (H, W) float32 in [0, 1], larger = nearer
    mask: np.ndarray    # (H, W) bool
    box: np.ndarray     # (4,) float32 x0, y0, x1, y1 in pixels
    name: str = ""


def _texture(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)().astype(np.float32) / 255.0
    return np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    from scipy.ndimage import zoom

    return zoom(rng.standard_normal((cells, cells)), size / cells, order=3)[:size, :size]


def _crop(tex, rng, size):
    h, w = tex.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    from skimage.transform import resize

    return resize(tex[y:y + side, x:x + side], (size, size), order=1, anti_aliasing=True).astype(np.float32)


def jitter_box(mask: np.ndarray, rng, frac: float = 0.1) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
    w, h = x1 - x0 + 1, y1 - y0 + 1
    j = rng.uniform(-frac, frac, 4) * np.array([w, h, w, h])
    H, W = mask.shape
    return np.clip(np.array([x0, y0, x1, y1]) + j, 0, [W - 1, H - 1, W - 1, H - 1]).astype(np.float32)


def make_scene(split: str, index: int, seed: int = 0, size: int = 128) -> Sample:
    rng = np.random.default_rng([zlib.crc32(split.encode()), index, seed])
    tex = _texture(TEXTURES[int(rng.integers(len(TEXTURES)))])
    bg, fg = _crop(tex, rng, size), _crop(tex, rng, size)
    fg = np.clip(fg * rng.uniform(0.93, 1.07) + rng.uniform(-0.03, 0.03), 0, 1)  # slight photometric mismatch
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.35, 0.65, 2)
    r = rng.uniform(0.15, 0.28)
    dist = np.hypot((yy - cy) / rng.uniform(0.7, 1.3), xx - cx)
    mask = dist < r * (1 + 0.35 * _smooth_noise(rng, size, 5))
    from scipy.ndimage import binary_fill_holes, label

    lab, n = label(mask)
    if n > 1:
        mask = lab == 1 + np.argmax(np.bincount(lab.ravel())[1:])
    mask = binary_fill_holes(mask)
    rgb = np.where(mask[..., None], fg, bg).astype(np.float32)
    plane = 0.2 + 0.25 * (rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx + 1) / 2
    bump = np.clip(1 - dist / (r * 1.6), 0, 1)
    depth = plane + mask * (rng.uniform(0.15, 0.35) + 0.1 * bump) + 0.02 * _smooth_noise(rng, size, 16)
    depth = np.clip(depth + 0.01 * rng.standard_normal(depth.shape), 0, 1).astype(np.float32)
    return Sample(rgb, depth, mask, jitter_box(mask, rng), f"{split}-{index:04d}")


def synthetic_split(split: str, n: int, seed: int = 0, size: int = 128) -> list[Sample]:
    return [make_scene(split, i, seed, size) for i in range(n)]


# ---------------------------------------------------------------- readers with one-line errors

def read_rgb(path: str | Path, what: str = "--rgb") -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p}: no such file")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{what} {p}: not an image file (give a PNG or JPEG)") from e


def check_depth(d: np.ndarray, what: str = "--depth") -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    if not np.isfinite(d).all():
        raise UserError(f"{what}: the depth map holds NaN or inf values; give finite depths")
    lo, hi = d.min(), d.max()
    if hi <= 0 or hi == lo:
        raise UserError(f"{what}: the depth map is constant (all zeros or one value); it carries no depth")
    return ((d - lo) / (hi - lo)).astype(np.float32)


def read_depth(path: str | Path, what: str = "--depth") -> np.ndarray:
    """A depth map image (8/16-bit PNG) or .npy, normalised to [0, 1] (larger = nearer is not assumed: as stored)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p}: no such file")
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UserError(f"{what} {p}: not a readable .npy array") from e
    else:
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("I") if im.mode not in ("F", "I;16") else im, dtype=np.float64)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{what} {p}: not an image file (give a PNG depth map or .npy)") from e
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise UserError(f"{what} {p}: a depth map must be 2-D, got shape {arr.shape}")
    return check_depth(arr, what)


def check_same_size(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape[:2] != b.shape[:2]:
        raise UserError(f"{what}: sizes differ ({a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}); "
                        "give images of the same size")


# ---------------------------------------------------------------- COD10K / NC4K / CAMO folder layout

IMAGE_DIRS, MASK_DIRS, DEPTH_DIRS = ("Imgs", "Image", "images", "RGB"), ("GT", "GT_Object", "masks"), ("Depth", "depth")


def _find_dir(root: Path, names) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def load_cod_folder(root: str | Path, size: int = 128, limit: int | None = None) -> list[Sample]:
    """A COD benchmark test folder: images in Imgs/ (or Image/, images/, RGB/), masks in GT/ (or GT_Object/,
    masks/), depth maps in Depth/ (or depth/; e.g. from a monocular estimator), matched by file stem."""
    from skimage.transform import resize

    root = Path(root)
    dirs = [_find_dir(root, n) for n in (IMAGE_DIRS, MASK_DIRS, DEPTH_DIRS)]
    if None in dirs:
        raise UserError(f"--data {root}: expected sub-folders for images {IMAGE_DIRS}, masks {MASK_DIRS} and "
                        f"depth {DEPTH_DIRS}")
    imgs, masks, depths = ({p.stem: p for p in d.iterdir() if p.suffix.lower() in (*IMAGE_EXT, ".npy")} for d in dirs)
    stems = sorted(set(imgs) & set(masks) & set(depths))[:limit]
    if not stems:
        raise UserError(f"--data {root}: no file stem has an image, a mask and a depth map")
    out = []
    for s in stems:
        rgb, d = read_rgb(imgs[s], "image"), read_depth(depths[s], "depth")
        m = read_rgb(masks[s], "mask").mean(-1) > 0.5
        check_same_size(rgb, m, f"{s}: image vs mask")
        rs = lambda a, o: resize(a, (size, size), order=o, anti_aliasing=o > 0).astype(np.float32)  # noqa: E731
        m = rs(m.astype(np.float32), 0) > 0.5
        if not m.any():
            continue
        out.append(Sample(rs(rgb, 1), rs(d, 1), m, jitter_box(m, np.random.default_rng(zlib.crc32(s.encode()))), s))
    return out
