"""RGB-D camouflage data: generated scenes from real photo textures, the COD benchmarks' folder layout, and readers.

Generated scene: background and object are two crops of the *same* real photograph texture (scikit-image data:
grass, gravel, brick, rough-wall-like rock; BSD-3 licence), so colour and texture match; the object is a smooth
random blob nearer to the camera than a tilted background plane (the depth cue SAM-COD targets). Box prompts are
the object's box jittered by up to 10% of its size. Every scene is a pure function of (split, index, seed).

Depth, by default, is what a real photo gets: *stereo*. The scene is two layers (background plane, nearer object)
with a known inverse depth ("nearness" n = 1/Z, Z in metres); a right view is rendered from them with the
pinhole relation disparity = f·B/Z (f·B = 24 px·m at 128 px, scaled with the image side), each layer warped
by its own disparity so the object occludes the background and uncovers real background texture beside it, both
views get camera noise, and depth is estimated from the pair by our block matching (``stereo.py``; integer
disparities, left-right check, row fill) — so the depth input has the estimator's holes, edge fattening and
quantisation. ``depth="clean"`` keeps the noise-free nearness map (the generator's ground truth).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
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
    info: dict = field(default_factory=dict)  # e.g. the stereo estimate's error against the true disparity


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


DEPTH_MODES = ("stereo", "clean")
FB_PX_M = 24.0       # focal length x baseline at 128 px (px·m): disparity = FB / Z = FB · nearness
CAMERA_NOISE = 0.01  # per-view pixel noise (std, intensity in [0, 1])
CAMERA_GAIN = 0.02   # per-view gain mismatch (uniform ±)


def _warp_layer(img: np.ndarray, disp: np.ndarray, iters: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Backward-warp a left-view layer into the right view: right(xr) = left(xl) with xl - disp(xl) = xr (solved
    by fixed-point iteration; disp is smooth). Returns (warped image, source x). Beyond the border: edge pixels."""
    H, W = disp.shape
    xr = np.arange(W, dtype=np.float64)[None].repeat(H, 0)
    rows = np.arange(H)[:, None]
    xl = xr + disp

    def sample(a, x):
        x = np.clip(x, 0, W - 1)
        x0 = np.floor(x).astype(int)
        x1 = np.minimum(x0 + 1, W - 1)
        t = (x - x0)[..., None] if a.ndim == 3 else x - x0
        return a[rows, x0] * (1 - t) + a[rows, x1] * t

    for _ in range(iters):
        xl = xr + sample(disp, xl)
    return sample(img, xl), xl


def render_stereo(bg: np.ndarray, fg: np.ndarray, mask: np.ndarray, bg_near: np.ndarray, fg_near: np.ndarray,
                  rng, size: int, noise: float = CAMERA_NOISE, gain: float = CAMERA_GAIN
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left, right, true left disparity) of a two-layer scene: the object layer (``fg`` inside ``mask``, nearness
    ``fg_near``) in front of the background layer (``bg``, ``bg_near``); nearness = 1/Z in 1/m."""
    fb = FB_PX_M * size / 128
    d_bg, d_fg = fb * bg_near, fb * fg_near
    right_bg, _ = _warp_layer(bg, d_bg)
    right_fg, _ = _warp_layer(fg, d_fg)
    right_mask, _ = _warp_layer(mask.astype(np.float64), d_fg)
    right = np.where(right_mask[..., None] > 0.5, right_fg, right_bg)  # the nearer layer occludes
    left = np.where(mask[..., None], fg, bg)
    views = []
    for v in (left, right):
        g = 1 + rng.uniform(-gain, gain)
        views.append(np.clip(v * g + noise * rng.standard_normal(v.shape), 0, 1).astype(np.float32))
    return views[0], views[1], np.where(mask, d_fg, d_bg).astype(np.float32)


def stereo_depth(bg, fg, mask, bg_near, fg_near, rng, size: int) -> tuple[np.ndarray, dict]:
    """Depth as a stereo camera + our block matching would give it: (normalised nearness, error vs the truth)."""
    from edgecloud.vision.stereo import block_matching, disparity_error

    left, right, true_disp = render_stereo(bg, fg, mask, bg_near, fg_near, rng, size)
    max_disp = int(np.ceil(true_disp.max())) + 4
    disp = block_matching(left, right, max_disp=max_disp, window=9)
    err = disparity_error(disp, true_disp)
    err["boundary_epe_px"] = _boundary_epe(disp, true_disp, mask)
    return check_depth(disp, "stereo depth"), err


def _boundary_epe(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, width: int = 3) -> float:
    """Disparity error within ``width`` px of the object's outline (where edge fattening lives)."""
    from scipy.ndimage import binary_dilation, binary_erosion

    band = binary_dilation(mask, iterations=width) & ~binary_erosion(mask, iterations=width)
    return float(np.abs(pred[band] - gt[band]).mean())


def make_scene(split: str, index: int, seed: int = 0, size: int = 128, depth: str = "stereo") -> Sample:
    if depth not in DEPTH_MODES:
        raise UserError(f"depth {depth!r}: choose one of {', '.join(DEPTH_MODES)}")
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
    offset, smooth = rng.uniform(0.15, 0.35), 0.02 * _smooth_noise(rng, size, 16)
    clean = plane + mask * (offset + 0.1 * bump) + smooth
    clean = np.clip(clean + 0.01 * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)
    box = jitter_box(mask, rng)
    name = f"{split}-{index:04d}"
    if depth == "clean":
        return Sample(rgb, clean, mask, box, name)
    # the camera's own random stream, so RGB, mask and box are those of the clean scene
    cam = np.random.default_rng([zlib.crc32(split.encode()), index, seed, 1])
    bg_near = plane + smooth  # nearness 1/Z (1/m): the background plane 2.2-5 m, the object 1.1-1.8 m away
    est, err = stereo_depth(bg, fg, mask, bg_near, bg_near + offset + 0.1 * bump, cam, size)
    return Sample(rgb, est, mask, box, name, err)


def synthetic_split(split: str, n: int, seed: int = 0, size: int = 128, depth: str = "stereo") -> list[Sample]:
    return [make_scene(split, i, seed, size, depth) for i in range(n)]


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
