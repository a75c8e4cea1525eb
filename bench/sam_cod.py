"""SAM-COD benchmark: docs/results/sam_cod.{json,md,png} (one run).

    nice -n 10 python bench/sam_cod.py            # the full run (depth estimated from rendered stereo pairs)
    python bench/sam_cod.py --quick               # the CLI's --quick preset
    python bench/sam_cod.py --clean-depth         # the generator's noise-free depth (the earlier benchmark)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from edgecloud.paths import REPO_ROOT
from edgecloud.results import Result, check_out_dir


def write(out: dict, cfg, out_dir: Path, started: float) -> dict:
    from edgecloud.vision.bench import grid_figure, public

    res = Result("sam_cod", public(out), seed=cfg.seed, started=started,
                 title=f"SAM-COD: generated RGB-D camouflage test split ({out['depth']} depth)")
    res.table(out["rows"], ["method", "prompt", "s_alpha", "e_phi", "wf_beta", "mae", "train_s", "train_cpu_s",
                            "quokka_s_alpha", "quokka_mae"],
              ["method", "prompt", "S_α", "E_φ (mean)", "weighted F_β", "MAE", "train s (wall)", "train CPU s",
               "quokka S_α", "quokka MAE"])
    st = out["stereo_middlebury"]
    depth = ("estimated by block matching from a rendered stereo pair per scene" if out["depth"] == "stereo"
             else "the generator's clean nearness map")
    res.markdown += (f"\nHeadline = box-prompt rows. SAM-COD − RGB adapter: ΔS_α = {out['s_alpha_gain_vs_rgb']:+.4f}, "
                     f"MAE {out['mae_samcod']:.4f} vs {out['mae_rgb_adapter']:.4f}; distillation share "
                     f"(SAM-COD − no distillation): ΔS_α = {out['distillation_share_s_alpha']:+.4f}. "
                     f"{out['images']} test / {out['train_images']} train images at {cfg.img_size} px, "
                     f"{cfg.steps} steps × batch {cfg.batch} per trained method. Depth: {depth}.\n\n")
    if "stereo_generated" in out:
        g = out["stereo_generated"]
        res.markdown += (f"Stereo depth on the generated scenes (vs their true disparity, {g['scenes']} scenes): "
                         f"EPE {g['epe_px']:.2f} px, bad-2 {g['bad2_pct']:.1f}%, EPE within 3 px of the object "
                         f"outline {g['boundary_epe_px']:.2f} px.\n\n")
    res.markdown += (
                     f"Stereo depth (block matching, Middlebury motorcycle at half resolution {st['size']}): "
                     f"EPE {st['epe_px']:.2f} px, bad-2 {st['bad2_pct']:.1f}% over {st['pixels']} GT pixels, "
                     f"{st['seconds']} s.\n")
    res.figure = grid_figure(out)
    res.write(out_dir)
    return res.with_provenance()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clean-depth", action="store_true", help="the generator's noise-free depth instead of stereo")
    ap.add_argument("--no-prompt-rows", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "results")
    a = ap.parse_args()
    check_out_dir(a.out)
    import torch

    torch.set_num_threads(int(os.environ.get("EDGECLOUD_THREADS", "1")))
    from edgecloud.vision.bench import BenchConfig, run

    started = time.time()
    depth = "clean" if a.clean_depth else "stereo"
    cfg = BenchConfig.quick(a.seed, depth) if a.quick else BenchConfig(seed=a.seed, depth=depth)
    cfg.no_prompt = a.no_prompt_rows
    out = run(cfg, show_progress=True)
    write(out, cfg, a.out, started)
    for r in out["rows"]:
        print(f"{r['method']:32s} {r['prompt']:4s} S={r['s_alpha']:.4f} E={r['e_phi']:.4f} wF={r['wf_beta']:.4f} "
              f"MAE={r['mae']:.4f}")


if __name__ == "__main__":
    main()
