"""SAM-COD: exactness of zero-init adapters, checkpoint formats, metrics vs hand cases, training/resume, bad input."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgecloud.errors import UserError
from edgecloud.vision import sam as S
from edgecloud.vision.data import check_depth, load_cod_folder, make_scene, read_rgb, synthetic_split
from edgecloud.vision.samcod import SAMCOD, CODConfig
from edgecloud.vision.train import cod_metrics, load_model, predict, read_checkpoint, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    m = S.SAM(64)
    with torch.no_grad():  # non-trivial attention biases and norms so the test exercises every path
        for n, p in m.named_parameters():
            if "attention_biases" in n:
                p.normal_(0, 0.5)
    return m.eval()


def _cfg(**kw):
    return CODConfig(**{"img_size": 64, "steps": 2, "batch": 2, "adapter_hidden": 4, **kw})


@pytest.mark.parametrize("variant", ["rgb", "depth", "early", "samcod"])
def test_zero_init_adapters_equal_frozen_sam_exactly(tiny_sam, variant):
    """Fresh adapters, prompt-update heads and the early-fusion depth filter are zero: each stream's output is
    bit-for-bit frozen SAM's output on that stream's input."""
    from edgecloud.vision.train import to_batch

    samples = synthetic_split("test", 2, 0, 64)
    zeroshot = SAMCOD(_cfg(variant="zeroshot"), copy.deepcopy(tiny_sam)).eval()
    model = SAMCOD(_cfg(variant=variant), copy.deepcopy(tiny_sam)).eval()
    rgb, depth, _, box = to_batch(samples)
    with torch.no_grad():
        out = model(rgb, depth, box)["streams"]
        for stream, logits in out.items():
            x = rgb if stream == "rgb" else depth.repeat(1, 3, 1, 1)
            torch.testing.assert_close(logits, zeroshot(x, depth, box)["logits"], rtol=0, atol=0)
    assert set(out) == set(model.streams) and model.streams


def test_pretrained_litemedsam_segments_a_real_photo():
    from edgecloud.vision.bench import real_rgbd_sample

    s = real_rgbd_sample(128)
    ys, xs = np.nonzero(s.mask)
    s.box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)  # the exact box (the bench jitters it)
    p = predict(SAMCOD(CODConfig(variant="zeroshot", img_size=128)), [s])[0] > 0.5
    iou = (p & s.mask).sum() / (p | s.mask).sum()
    assert iou > 0.8  # measured 0.846 at 128 px (0.957 at 256)


def vit_b_layout() -> dict[str, tuple[int, ...]]:
    """The image-encoder keys and shapes of the released sam_vit_b_01ec64.pth, written out from its published
    configuration (embed 768, 12 blocks, 12 heads, window 14, global attention in blocks 2, 5, 8, 11, 64x64 grid,
    16 px patches, neck to 256) independently of the module under test."""
    e = "image_encoder."
    out = {e + "pos_embed": (1, 64, 64, 768), e + "patch_embed.proj.weight": (768, 3, 16, 16),
           e + "patch_embed.proj.bias": (768,), e + "neck.0.weight": (256, 768, 1, 1), e + "neck.1.weight": (256,),
           e + "neck.1.bias": (256,), e + "neck.2.weight": (256, 256, 3, 3), e + "neck.3.weight": (256,),
           e + "neck.3.bias": (256,)}
    for i in range(12):
        b, rel = f"{e}blocks.{i}.", 127 if i in (2, 5, 8, 11) else 27
        out.update({b + "norm1.weight": (768,), b + "norm1.bias": (768,), b + "attn.rel_pos_h": (rel, 64),
                    b + "attn.rel_pos_w": (rel, 64), b + "attn.qkv.weight": (2304, 768), b + "attn.qkv.bias": (2304,),
                    b + "attn.proj.weight": (768, 768), b + "attn.proj.bias": (768,), b + "norm2.weight": (768,),
                    b + "norm2.bias": (768,), b + "mlp.lin1.weight": (3072, 768), b + "mlp.lin1.bias": (3072,),
                    b + "mlp.lin2.weight": (768, 3072), b + "mlp.lin2.bias": (768,)})
    return out


@pytest.fixture(scope="module")
def vit_b_checkpoint(tiny_sam, tmp_path_factory):
    """A randomly initialised state dict in the exact sam_vit_b_01ec64.pth key layout, saved as a .pth."""
    g = torch.Generator().manual_seed(0)
    sd = {k: 0.02 * torch.randn(shape, generator=g) for k, shape in vit_b_layout().items()}
    sd.update({k: v.clone() for k, v in tiny_sam.state_dict().items() if k.startswith(("prompt_", "mask_"))})
    path = tmp_path_factory.mktemp("vitb") / "sam_vit_b_01ec64.pth"
    torch.save(sd, path)
    return path, sd


def test_official_vit_b_checkpoint_loads_round_trip_and_runs(vit_b_checkpoint):
    from edgecloud.vision.vit import ImageEncoderViT

    path, sd = vit_b_checkpoint
    m = S.load_sam(64, path)  # torch.load(weights_only=True) inside
    enc = m.image_encoder
    assert isinstance(enc, ImageEncoderViT) and [b.window for b in enc.blocks] == [14, 14, 0] * 4
    assert sum(p.numel() for p in enc.parameters()) == sum(int(np.prod(s)) for s in vit_b_layout().values())
    own = m.state_dict()
    assert set(own) == set(sd)
    for k, v in sd.items():
        assert torch.equal(own[k], v), k
    img, box = torch.rand(1, 3, 64, 64), torch.tensor([[8.0, 10.0, 50.0, 40.0]])
    with torch.no_grad():
        assert enc(img).shape == (1, 256, 4, 4)  # 64 px / 16 px patches; pos-embed and global rel-pos resized
        logits = m(img, box)
    assert logits.shape == (1, 1, 64, 64) and torch.isfinite(logits).all()
    # SAM-COD builds its streams on the ViT the same way: zero-init adapters leave it exactly unchanged
    model = SAMCOD(_cfg(variant="samcod"), m).eval()
    with torch.no_grad():
        out = model(img, img[:, :1], box)["streams"]["rgb"]
    torch.testing.assert_close(out, logits, rtol=0, atol=0)


def test_another_architecture_is_one_clear_error(vit_b_checkpoint, tmp_path):
    from safetensors.torch import save_file

    _, sd = vit_b_checkpoint
    bad = dict(sd)
    bad["image_encoder.blocks.3.attn.qkv.weight"] = torch.zeros(2304, 700)
    torch.save(bad, tmp_path / "b.pth")
    with pytest.raises(UserError, match=r"mis-shaped.*blocks\.3\.attn\.qkv"):
        S.load_sam(64, tmp_path / "b.pth")
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="does not match"):
        S.load_sam(64, tmp_path / "other.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        S.load_sam(64, tmp_path / "junk.pth")


@torch.no_grad()
def test_relative_position_attention_against_a_loop_reference():
    """SAM's decomposed relative positions: logit(i, j) = q_i.k_j/sqrt(d) + q_i.Rh[hi-hj] + q_i.Rw[wi-wj]."""
    from edgecloud.vision.vit import RelPosAttention

    torch.manual_seed(0)
    H, W, d = 3, 4, 8
    att = RelPosAttention(d, 1, 2 * 4 - 1)
    with torch.no_grad():
        att.rel_pos_h.normal_()
        att.rel_pos_w.normal_()
    x = torch.randn(1, H, W, d)
    q, k, v = att.qkv(x).view(H * W, 3, d).unbind(1)
    Rh = torch.nn.functional.interpolate(att.rel_pos_h.T[None], size=2 * H - 1, mode="linear")[0].T  # 7 -> 5 rows
    pos = [(i, j) for i in range(H) for j in range(W)]
    logits = torch.tensor([[float(q[a] @ k[b] / d ** 0.5 + q[a] @ Rh[pa[0] - pb[0] + H - 1]
                                  + q[a] @ att.rel_pos_w[pa[1] - pb[1] + W - 1])
                            for b, pb in enumerate(pos)] for a, pa in enumerate(pos)])
    ref = att.proj(logits.softmax(-1) @ v).view(1, H, W, d)
    torch.testing.assert_close(att(x), ref, rtol=1e-5, atol=1e-5)


def test_metrics_against_hand_cases():
    gt = np.zeros((32, 32), bool)
    gt[8:24, 8:24] = True
    perfect = cod_metrics([gt.astype(np.float32)], [gt])
    assert perfect["s_alpha"] == pytest.approx(1.0) and perfect["mae"] == 0.0
    assert perfect["wf_beta"] == pytest.approx(1.0)
    # 0.5 is stored as 128/255; a quarter of the pixels are object (error 127/255), the rest background (128/255)
    half = cod_metrics([np.full((32, 32), 0.5, np.float32)], [gt])
    assert half["mae"] == pytest.approx((0.25 * 127 + 0.75 * 128) / 255, abs=1e-9)
    inverted = cod_metrics([(~gt).astype(np.float32)], [gt])
    assert inverted["mae"] == 1.0 and inverted["s_alpha"] < 0.2


@pytest.mark.slow
def test_training_resumes_exactly_and_checkpoint_guard(tiny_sam, tmp_path):
    samples = synthetic_split("train", 4, 0, 64)
    cfg = _cfg(variant="samcod", steps=3, batch=1)
    full, log = train(cfg, samples, sam=copy.deepcopy(tiny_sam), show_progress=False)
    assert set(log[-1]) >= {"seg", "model_kd", "modal_kd"}
    ck = tmp_path / "c.safetensors"
    train(_cfg(variant="samcod", steps=3, batch=1), samples, ckpt=ck, every=2, sam=copy.deepcopy(tiny_sam),
          show_progress=False)
    assert read_checkpoint(ck)[2] == 3
    # interrupted after step 2, then resumed to step 3: identical to the uninterrupted run
    ck2 = tmp_path / "c2.safetensors"
    train(_cfg(variant="samcod", steps=2, batch=1), samples, ckpt=ck2, sam=copy.deepcopy(tiny_sam),
          show_progress=False)
    assert read_checkpoint(ck2)[2] == 2
    resumed, _ = train(cfg, samples, ckpt=ck2, sam=copy.deepcopy(tiny_sam), show_progress=False)
    for k, v in full.trained_state().items():
        torch.testing.assert_close(resumed.trained_state()[k], v, rtol=1e-5, atol=1e-6)
    loaded = load_model(ck, copy.deepcopy(tiny_sam))
    np.testing.assert_allclose(predict(loaded, samples[:1])[0], predict(full, samples[:1])[0], atol=1e-5)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other), metadata={"arch": "resnet"})
    with pytest.raises(UserError, match="architecture"):
        read_checkpoint(other)


def test_scenes_are_deterministic_and_camouflaged():
    a, b = make_scene("train", 3, 0), make_scene("train", 3, 0)
    np.testing.assert_array_equal(a.rgb, b.rgb)
    assert 0.02 < a.mask.mean() < 0.5
    # colour matches (camouflage), depth does not: object/background differ far more in depth than in colour
    dc = abs(a.rgb[a.mask].mean() - a.rgb[~a.mask].mean())
    dd = a.depth[a.mask].mean() - a.depth[~a.mask].mean()
    assert dd > 0.1 and dd > 2 * dc


def test_stereo_render_occludes_like_a_two_layer_scene():
    """Constant disparities (3 px background, 7 px object), no camera noise: the right view is exactly the object
    shifted by 7 px where its shifted mask lands and the background shifted by 3 px elsewhere (disocclusions show
    real background); block matching recovers the disparities away from the left border and the outline."""
    from edgecloud.vision.data import render_stereo
    from edgecloud.vision.stereo import block_matching

    rng = np.random.default_rng(0)
    H, W = 48, 64
    bg, fg = rng.random((H, W, 3)), rng.random((H, W, 3))
    mask = np.zeros((H, W), bool)
    mask[14:34, 24:44] = True
    fb = 24.0  # size 128: disparity = 24 * nearness
    left, right, disp = render_stereo(bg, fg, mask, np.full((H, W), 3 / fb), np.full((H, W), 7 / fb), rng, 128,
                                      noise=0.0, gain=0.0)
    np.testing.assert_allclose(left, np.where(mask[..., None], fg, bg), atol=1e-6)
    xs = np.arange(W - 8)
    shifted_mask = mask[:, xs + 7]
    expect = np.where(shifted_mask[..., None], fg[:, xs + 7], bg[:, xs + 3])
    np.testing.assert_allclose(right[:, :W - 8], expect, atol=1e-6)
    assert np.array_equal(np.unique(disp), [3, 7])
    est = block_matching(left, right, max_disp=12, window=5)
    interior = np.zeros_like(mask)
    interior[5:-5, 12:-5] = True
    from scipy.ndimage import binary_dilation
    interior &= ~(binary_dilation(mask, iterations=4) & ~binary_dilation(~mask, iterations=4))
    assert (est[interior] == disp[interior]).mean() > 0.98


def test_generated_depth_is_a_stereo_estimate_of_the_clean_scene():
    clean, est = make_scene("val", 1, 0, 96, "clean"), make_scene("val", 1, 0, 96)
    for a in ("rgb", "mask", "box"):  # the same scene; only the depth differs
        np.testing.assert_array_equal(getattr(clean, a), getattr(est, a))
    assert np.corrcoef(clean.depth.ravel(), est.depth.ravel())[0, 1] < 0.99
    scenes = [est] + [make_scene("val", i, 0, 96) for i in (0, 2, 3, 4, 5)]
    epe = np.mean([s.info["epe_px"] for s in scenes])  # measured 1.52 px (0.56..4.64: textureless scenes fail)
    assert 0.3 < epe < 3.0  # the estimator's error, of Middlebury's order (1.76 px)
    assert np.mean([s.info["boundary_epe_px"] for s in scenes]) > epe  # edge fattening at the outline (1.84 px)
    assert all(s.depth[s.mask].mean() > s.depth[~s.mask].mean() for s in scenes)  # the object still reads nearer
    with pytest.raises(UserError, match="depth 'mono'"):
        make_scene("val", 0, depth="mono")


def test_cod_folder_loader_on_a_fake_tree(tmp_path):
    from PIL import Image

    for d in ("Imgs", "GT", "Depth"):
        (tmp_path / d).mkdir()
    rng = np.random.default_rng(0)
    for name in ("COD10K-CAM-1", "COD10K-CAM-2"):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "Imgs" / f"{name}.jpg")
        m = np.zeros((40, 50), np.uint8)
        m[10:30, 15:35] = 255
        Image.fromarray(m).save(tmp_path / "GT" / f"{name}.png")
        Image.fromarray(rng.integers(1, 255, (20, 25), dtype=np.uint8)).save(tmp_path / "Depth" / f"{name}.png")
    out = load_cod_folder(tmp_path, size=64)
    assert [s.name for s in out] == ["COD10K-CAM-1", "COD10K-CAM-2"]
    assert out[0].rgb.shape == (64, 64, 3) and out[0].depth.shape == (64, 64) and out[0].mask.any()
    with pytest.raises(UserError, match="sub-folders"):
        load_cod_folder(tmp_path / "Imgs")


def test_depth_and_image_validation(tmp_path):
    with pytest.raises(UserError, match="NaN or inf"):
        check_depth(np.array([[1.0, np.nan]]))
    with pytest.raises(UserError, match="constant"):
        check_depth(np.zeros((4, 4)))
    junk = tmp_path / "x.png"
    junk.write_text("not an image")
    with pytest.raises(UserError, match="not an image"):
        read_rgb(junk)


def test_block_matching_on_middlebury_motorcycle():
    from edgecloud.vision.bench import stereo_check

    r = stereo_check()
    assert r["epe_px"] < 2.5 and r["bad2_pct"] < 20  # measured 1.76 px, 14.7%


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgecloud.cli", "vision", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.arange(620, dtype=np.uint8).reshape(20, 31)).save(tmp_path / "d_big.png")
    np.save(tmp_path / "nan.npy", np.full((20, 30), np.nan))
    np.save(tmp_path / "zero.npy", np.zeros((20, 30)))
    (tmp_path / "junk.png").write_text("no")
    (tmp_path / "ck.safetensors").write_text("no")
    out = tmp_path / "m.png"
    np.save(tmp_path / "ok.npy", np.arange(600.0).reshape(20, 30))
    t = lambda name: str(tmp_path / name)  # noqa: E731
    cases = [(["--depth", t("d_big.png")], "sizes differ"), (["--depth", t("nan.npy")], "NaN"),
             (["--depth", t("zero.npy")], "constant"), (["--depth", t("junk.png")], "not an image"),
             (["--depth", t("ok.npy"), "--checkpoint", t("ck.safetensors")], "not a safetensors checkpoint"),
             (["--depth", t("ok.npy"), "--sam-checkpoint", t("junk.png")], "not a readable checkpoint")]
    for extra, msg in cases:
        r = _cli("cod", "--rgb", str(tmp_path / "a.png"), "--out", str(out), *extra)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_bench_contract_keys_on_a_tiny_run():
    from edgecloud.results import report
    from edgecloud.vision.bench import BenchConfig, public, run

    out = json.loads(report(public(run(BenchConfig(n_train=2, n_test=2, steps=1, batch=1, img_size=64)))))
    for k in ("s_alpha_rgb_adapter", "s_alpha_samcod", "mae_rgb_adapter", "mae_samcod", "images", "provenance",
              "s_alpha_samcod_noprompt", "s_alpha_rgb_adapter_noprompt", "stereo_generated"):
        assert k in out
    assert out["images"] == 2 and len(out["rows"]) == 9 and out["depth"] == "stereo"
    assert [r["prompt"] for r in out["rows"]] == ["box"] * 6 + ["none"] * 3
    assert all(0 <= r["s_alpha"] <= 1 and 0 <= r["mae"] <= 1 for r in out["rows"])
