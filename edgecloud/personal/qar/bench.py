"""The six arms on held-out exchanges of both corpora: base, LoRA, LoRA + questioner's name in the prompt, QAR
without the contrastive loss, QAR without clustering, QAR. ROUGE-L / BLEU-1..4, paired bootstrap over exchanges
(scores averaged over seeds first), and the questioner probe on each tower's pooled reply state.

Every arm is trained from the same base for the same steps on the same exchanges with the same seeds; only the
prompt (name or not), the towers and the losses differ. The frozen lower layers' states are computed once per
prompt style and shared by all arms and seeds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from edgecloud.errors import UserError
from edgecloud.personal.qar.exchanges import DataConfig, build
from edgecloud.personal.qar.model import ModelConfig
from edgecloud.personal.qar.train import TrainConfig

ARMS = ("base", "lora", "name_prompt", "qar_nocon", "qar_nocluster", "qar")
# arm -> (lora, towers, named, contrastive, clustered)
ARM_SPEC = {"base": (False, False, False, False, False), "lora": (True, False, False, False, False),
            "name_prompt": (True, False, True, False, False), "qar_nocon": (True, True, True, False, True),
            "qar_nocluster": (True, True, True, True, False), "qar": (True, True, True, True, True)}


@dataclass(frozen=True)
class BenchConfig:
    corpora: tuple[str, ...] = ("plays", "chat")
    seeds: tuple[int, ...] = (0,)
    steps: int = 30  # one epoch of max_train at batch_size 8
    batch_size: int = 8
    lr: float = 4e-3
    top_layers: int = 3
    max_train: int = 240
    max_eval: int = 80
    probe_train: int = 160  # training exchanges the probe fits on
    max_new_tokens: int = 16
    n_boot: int = 2000
    base: str = "smollm2-135m"

    @classmethod
    def quick(cls, **kw) -> BenchConfig:
        return cls(**{"corpora": ("plays",), "steps": 8, "max_train": 64, "max_eval": 24, "max_new_tokens": 12,
                      "n_boot": 500, **kw})

    def __post_init__(self):
        if not self.seeds:
            raise UserError("--seeds: give at least one seed")
        for c in self.corpora:
            DataConfig(corpus=c)


def arm_configs(arm: str, bc: BenchConfig, n_pairs: int, n_clusters: int, seed: int):
    lora, towers, named, con, clustered = ARM_SPEC[arm]
    mc = ModelConfig(base=bc.base, top_layers=bc.top_layers, lora=lora, towers=towers, n_pairs=n_pairs,
                     n_clusters=n_clusters, init_seed=seed)
    tc = TrainConfig(steps=bc.steps, batch_size=bc.batch_size, lr=bc.lr, contrastive_weight=0.5 if con else 0.0,
                     named=named, clustered=clustered, seed=seed)
    return mc, tc


def run_corpus(corpus: str, bc: BenchConfig, log=print) -> dict:
    import torch

    from edgecloud.llm.models import load_model
    from edgecloud.personal.qar.clusters import assign
    from edgecloud.personal.qar.metrics import probe_accuracy, scores
    from edgecloud.personal.qar.model import DualTower
    from edgecloud.personal.qar.train import bottom_states, encode, pooled_states, train

    t0 = time.time()
    ds = build(DataConfig(corpus=corpus, max_train=bc.max_train, max_eval=bc.max_eval))
    ks = assign(ds)
    n_clusters = sum(ks.values())
    resp_idx = {r: i for i, r in enumerate(ds.responders)}
    # the no-clustering ablation: one cluster per responder
    flat_train = [replace(e, cluster=resp_idx[e.responder]) for e in ds.train]
    log(f"[{corpus}] {ds.counts()} clusters {n_clusters} (k per responder {sorted(ks.values())})")
    frozen = DualTower(load_model(bc.base), ModelConfig(base=bc.base, top_layers=bc.top_layers, lora=False,
                                                        towers=False))
    tok = frozen.tok
    states = {named: bottom_states(frozen, [p + r for p, r in (encode(tok, e, named) for e in ds.train)])
              for named in (False, True)}
    held_states = bottom_states(frozen, [sum(encode(tok, e, True), []) for e in ds.heldout])
    log(f"[{corpus}] frozen-layer states computed ({time.time() - t0:.0f} s)")
    refs = [e.reply for e in ds.heldout]
    prompts = {named: [encode(tok, e, named)[0] for e in ds.heldout] for named in (False, True)}
    prefilled = {named: frozen.prefill_bottom(prompts[named]) for named in (False, True)}
    pairs = [e.pair for e in ds.heldout]
    per_arm: dict[str, dict] = {}
    examples: dict[str, list[str]] = {}
    probes: dict[str, list] = {}
    train_info: dict[str, list] = {}
    for arm in ARMS:
        rl_seeds, bleu_seeds = [], []
        seeds = bc.seeds if arm != "base" else bc.seeds[:1]  # the base model is deterministic
        for seed in seeds:
            torch.manual_seed(seed)
            mc, tc = arm_configs(arm, bc, len(ds.pairs), n_clusters if arm != "qar_nocluster" else len(resp_idx),
                                 seed)
            model = frozen if arm == "base" else DualTower(load_model(bc.base), mc)
            if arm != "base":
                tset = flat_train if not tc.clustered else ds.train
                info = train(model, tset, tc, states=states[tc.named], log=lambda m, a=arm: log(f"[{corpus}/{a}] {m}"))
                train_info.setdefault(arm, []).append(info)
            t1 = time.time()
            out = model.generate(prompts[tc.named], pairs, bc.max_new_tokens, prefilled=prefilled[tc.named])
            hyps = [tok.decode(o, skip_special_tokens=True).strip() for o in out]
            sc = scores(hyps, refs)
            rl_seeds.append(sc["rougeL"])
            bleu_seeds.append(sc["bleu_counts"])
            log(f"[{corpus}/{arm}] seed {seed} ROUGE-L {sc['rougeL_mean']:.4f} BLEU-1 {sc['bleu1']:.4f} "
                f"(generation {time.time() - t1:.0f} s)")
            if arm != "base" and mc.towers:
                ptr = ds.train[:bc.probe_train]
                g_tr, s_tr = pooled_states(model, ptr, True, states=states[True][:bc.probe_train])
                g_te, s_te = pooled_states(model, ds.heldout, True, states=held_states)
                ytr, yte = [e.pair for e in ptr], [e.pair for e in ds.heldout]
                gtr, gte = [e.responder for e in ptr], [e.responder for e in ds.heldout]
                probes.setdefault(arm, []).append({"specific": probe_accuracy(s_tr, ytr, gtr, s_te, yte, gte, seed),
                                                   "general": probe_accuracy(g_tr, ytr, gtr, g_te, yte, gte, seed)})
            if seed == seeds[0]:
                examples[arm] = hyps[:3]
            del model
        rl = np.mean(rl_seeds, 0)
        bc_sum = np.mean([b.sum(0) for b in bleu_seeds], 0)
        from edgecloud.personal.qar.metrics import bleu_from_counts

        per_arm[arm] = {"rougeL": rl, "rougeL_mean": float(rl.mean()),
                        "rougeL_per_seed": [float(x.mean()) for x in rl_seeds],
                        **{f"bleu{k}": bleu_from_counts(bc_sum, k) for k in range(1, 5)}}
    return {"corpus": corpus, "counts": {**ds.counts(), "clusters": n_clusters, "k_per_responder": ks},
            "arms": per_arm, "probes": probes, "train": train_info, "wall_s": round(time.time() - t0, 1),
            "examples": {"question": [e.question for e in ds.heldout[:3]], "reference": refs[:3], **examples},
            "questioner_names": sorted({q for _, q in ds.pairs}), "responder_names": ds.responders}


def summarize(runs: list[dict], bc: BenchConfig) -> dict:
    """Contract keys pooled over every held-out exchange of the corpora run; per-corpus detail beside them."""
    from edgecloud.personal.qar.metrics import paired_bootstrap

    pooled = {a: np.concatenate([r["arms"][a]["rougeL"] for r in runs]) for a in ARMS}
    out: dict = {f"rougeL_{a}": float(pooled[a].mean()) for a in ARMS}
    comps = {"vs_lora": ("qar", "lora"), "vs_name_prompt": ("qar", "name_prompt"),
             "nocon_vs_name_prompt": ("qar_nocon", "name_prompt"), "nocluster_vs_name_prompt":
             ("qar_nocluster", "name_prompt"), "qar_vs_nocon": ("qar", "qar_nocon")}
    boots = {k: paired_bootstrap(pooled[a], pooled[b], bc.n_boot) for k, (a, b) in comps.items()}
    out["rel_gain_vs_lora"] = boots["vs_lora"]["rel_gain"]
    out["rel_gain_vs_name_prompt"] = boots["vs_name_prompt"]["rel_gain"]
    out["p_vs_lora"] = boots["vs_lora"]["p_value"]
    out["p_vs_name_prompt"] = boots["vs_name_prompt"]["p_value"]
    out["bootstrap"] = boots
    gain = out["rougeL_qar"] - out["rougeL_name_prompt"]
    lost = out["rougeL_qar"] - out["rougeL_qar_nocon"]
    out["nocon_share_of_gain_lost"] = lost / gain if gain > 0 else None
    out["goal_met"] = bool(out["rel_gain_vs_lora"] >= 0.08 and out["rel_gain_vs_name_prompt"] >= 0.08
                           and out["p_vs_lora"] < 0.05 and out["p_vs_name_prompt"] < 0.05
                           and out["nocon_share_of_gain_lost"] is not None and out["nocon_share_of_gain_lost"] >= 0.5)
    out["questioners"] = sum(r["counts"]["questioners"] for r in runs)
    out["responders"] = sum(r["counts"]["responders"] for r in runs)
    out["heldout_exchanges"] = sum(r["counts"]["heldout_exchanges"] for r in runs)
    out["corpora"] = {}
    for r in runs:
        arms = {a: {k: v for k, v in d.items() if k != "rougeL"} for a, d in r["arms"].items()}
        per = {k: paired_bootstrap(r["arms"][a]["rougeL"], r["arms"][b]["rougeL"], bc.n_boot)
               for k, (a, b) in comps.items()}
        probes = {a: {t: float(np.mean([p[t]["accuracy"] for p in ps if p[t]["accuracy"] is not None]))
                      for t in ("specific", "general")} | {"majority": ps[0]["specific"]["majority"]}
                  for a, ps in r["probes"].items()}
        out["corpora"][r["corpus"]] = {"counts": r["counts"], "arms": arms, "bootstrap": per, "probe": probes,
                                       "train": r["train"], "examples": r["examples"], "wall_s": r["wall_s"]}
    out["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in bc.__dict__.items()}
    return out


ARM_LABELS = {"base": "base SmolLM2", "lora": "LoRA", "name_prompt": "LoRA + name in prompt",
              "qar_nocon": "QAR w/o contrastive", "qar_nocluster": "QAR w/o clustering", "qar": "QAR"}


def write_results(data: dict, out, seed: int):
    """docs/results/questioner_aware.{json,md,png} through the shared results layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgecloud.results import Result

    res = Result("questioner_aware", data, seed=seed, title="Questioner-aware responders (QAR) on plays and chat")
    for c, d in data["corpora"].items():
        n = d["counts"]
        res.markdown += f"\n## {c}: {n['responders']} responders, {n['questioners']} questioners, " \
                        f"{d['counts']['train_exchanges']} training / {d['counts']['heldout_exchanges']} held-out " \
                        f"exchanges, {d['counts']['clusters']} clusters\n\n"
        rows = [{"arm": ARM_LABELS[a], **{k: d["arms"][a][k] for k in ("rougeL_mean", "bleu1", "bleu2", "bleu3",
                                                                       "bleu4")}} for a in ARMS]
        res.table(rows, ["arm", "rougeL_mean", "bleu1", "bleu2", "bleu3", "bleu4"],
                  ["arm", "ROUGE-L F1", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"])
        brows = [{"comparison": k, "rel_gain": v["rel_gain"], "ci_lo": v["ci95"][0], "ci_hi": v["ci95"][1],
                  "p": v["p_value"]} for k, v in d["bootstrap"].items()]
        res.table(brows, ["comparison", "rel_gain", "ci_lo", "ci_hi", "p"],
                  ["comparison (ROUGE-L)", "relative gain", "95% CI low", "95% CI high", "p (one-sided)"])
        if d["probe"]:
            prow = [{"arm": ARM_LABELS[a], **v} for a, v in d["probe"].items()]
            res.table(prow, ["arm", "specific", "general", "majority"],
                      ["probe (questioner accuracy)", "specific tower", "general tower", "majority class"])
    res.markdown += (f"\n**Pooled over corpora**: QAR vs LoRA {data['rel_gain_vs_lora']:+.1%} "
                     f"(p {data['p_vs_lora']:.3f}), "
                     f"vs name-in-prompt {data['rel_gain_vs_name_prompt']:+.1%} (p {data['p_vs_name_prompt']:.3f}); "
                     f"goal met: {data['goal_met']}.\n")
    corpora = list(data["corpora"])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    w = 0.8 / len(corpora)
    for j, c in enumerate(corpora):
        vals = [data["corpora"][c]["arms"][a]["rougeL_mean"] for a in ARMS]
        ax.bar(np.arange(len(ARMS)) + j * w, vals, w, label=c)
    ax.set_xticks(np.arange(len(ARMS)) + w * (len(corpora) - 1) / 2, [ARM_LABELS[a] for a in ARMS], rotation=20,
                  fontsize=8)
    ax.set_ylabel("held-out ROUGE-L F1")
    ax.legend()
    fig.tight_layout()
    res.figure = fig
    return res.write(out)
