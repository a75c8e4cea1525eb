"""One bench run: every arm trained and evaluated on the same cached features, then attacked.

Arms: ``none`` (z = 0: the learned prefix alone), ``static`` (a learned embedding per user: the non-private upper
bound), ``mixture`` (linearly dependent regime) and ``gaussian`` at each sigma of the variance sweep (close
distributions). Everything that does not change across arms and seeds (users, split, candidates, tokenization, the
frozen lower layers) is computed once and cached.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from edgecloud.errors import UserError
from edgecloud.personal.anon import attack, cloud, critic, data, device, features


@dataclass(frozen=True)
class BenchConfig:
    data: data.DataConfig = field(default_factory=data.DataConfig)
    cloud: cloud.CloudConfig = field(default_factory=cloud.CloudConfig)
    dim: int = 16  # embedding dimension = rank of the shared basis
    anchors: int = 4  # mixture regime: shared anchors (below the number of users: linearly dependent)
    alpha: float = 1.0  # mixture regime: smoothing of a user's anchor weights
    mixture_sigma: float = 0.5  # mixture regime: spread around each anchor
    radius: float = 1.0  # gaussian regime: user means are pulled inside this radius
    sigmas: tuple[float, ...] = (0.0, 0.5, 2.0)  # gaussian regime: the variance sweep
    headline_sigma: float = 2.0  # the gaussian arm reported as acc_anonymous (fixed before looking at results)
    attack_uploads: int = 20  # later uploads per user the attacker must attribute
    seeds: tuple[int, ...] = (0, 1, 2)
    skip_mixture: bool = False  # leave out the mixture arm (a short run of the headline arms only)
    contrast: bool = True  # also rank candidates by NLL(c | z) - NLL(c | mean upload) (cloud.evaluate)
    model: str = "smollm2-135m"
    space: str = "style"  # style: MiniLM of the device's whole history (.style); lm: LM features of n_train replies
    history: int = 100  # style space: training-period replies per user the device embeds
    style_head: bool = True  # style space: also rank by the discriminative style head (.critic), trained per arm
    critic_cfg: critic.CriticConfig = field(default_factory=critic.CriticConfig)
    static: str = "mean"  # mean: the user's fixed mean in the shared space; table: a learned free vector per user

    def __post_init__(self):
        if self.space not in ("style", "lm"):
            raise UserError(f"space={self.space!r}: choose style (MiniLM of the history) or lm (LM features)")
        if self.static not in ("mean", "table"):
            raise UserError(f"static={self.static!r}: choose mean (the user's mean embedding) or table (learned)")
        if self.history < 8:
            raise UserError(f"history={self.history}: a device needs at least 8 of its replies to fit a distribution")
        if self.dim < 1 or self.anchors < 2:
            raise UserError(f"dim={self.dim}, anchors={self.anchors}: need dim >= 1 and anchors >= 2")
        if self.anchors >= self.data.users:
            raise UserError(f"anchors={self.anchors} must be below users={self.data.users} (the linearly dependent "
                            "regime needs rank below the number of users)")
        if self.headline_sigma not in self.sigmas:
            raise UserError(f"headline_sigma={self.headline_sigma} is not one of sigmas {self.sigmas}")
        if any(s < 0 for s in self.sigmas) or self.mixture_sigma < 0 or self.radius <= 0:
            raise UserError("sigmas and mixture_sigma must be >= 0 and radius > 0")
        if not self.seeds:
            raise UserError("seeds: give at least one seed")


def quick_config(seed: int = 0) -> BenchConfig:
    return BenchConfig(data=data.DataConfig(users=8, n_train=24, n_eval=4), seeds=(seed,), anchors=3,
                       cloud=cloud.CloudConfig(epochs=2.0))


def arms(cfg: BenchConfig) -> list[tuple[str, str, float]]:
    """(name, kind, sigma) per arm."""
    mix = [] if cfg.skip_mixture else [("mixture", "mixture", cfg.mixture_sigma)]
    return ([("none", "none", 0.0), ("static", "static", 0.0)] + mix
            + [(f"gaussian s={s:g}", "gaussian", s) for s in cfg.sigmas])


def _log(msg: str) -> None:
    print(f"[anon {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fit_users(kind: str, sigma: float, cfg: BenchConfig, feats: torch.Tensor, users: torch.Tensor, n_users: int,
              basis: device.Basis, radius: float | None = None) -> list[device.Distribution]:
    r = cfg.radius if radius is None else radius
    return [device.fit(feats[users == u], basis, kind, sigma=sigma, radius=r, alpha=cfg.alpha)
            for u in range(n_users)]


def device_features(cfg: BenchConfig, train: features.Packed, tr_users: torch.Tensor, fingerprint: str):
    """(message features, their users, space fingerprint): what each device summarizes itself by."""
    if cfg.space == "lm":
        return features.reply_features(train), tr_users, fingerprint
    from edgecloud.personal.anon import style

    f, u = style.history_features(cfg.data, cfg.history)
    return f, u, f"{fingerprint}+{style.ENCODER}"


def embed_time_ms(dist: device.Distribution, basis: device.Basis, n: int = 2000) -> float:
    """Device-side cost of one upload's embedding: one fresh sample (mean over ``n`` calls)."""
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for _ in range(n):
        dist.sample(1, basis, gen)
    return (time.perf_counter() - t) / n * 1e3


def run(cfg: BenchConfig, log=_log, on_seed=None) -> dict:
    """Every arm for every seed; ``on_seed(summary)`` is called after each seed, and during the first seed after
    each arm once the headline arms are in (the full bench writes partial results then, so a run cut short still
    leaves what it finished)."""
    from edgecloud.llm.models import load_model

    torch.set_num_threads(1)
    t0 = time.time()
    ds = data.build(cfg.data)
    log(f"data: {ds.summary()}")
    lm = load_model(cfg.model)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    train, evals = features.build_features(lm, ds, cfg.cloud.n_top)
    log(f"features ready ({time.time() - t0:.0f} s): {train.hidden.shape[0]} + {evals.hidden.shape[0]} tokens")
    U = len(ds.user_ids)
    tr_users = torch.tensor([e.user for e in ds.train])
    ev_users = torch.tensor([e.user for e in ds.eval])
    msg_feats, msg_users, space_fp = device_features(cfg, train, tr_users, lm.fingerprint)
    log(f"device features ({cfg.space} space): {tuple(msg_feats.shape)} from {len(msg_users)} messages")
    hmean, hstd = cloud.hidden_stats(train)
    vocab = cloud.vocabulary(train, evals)
    log(f"vocabulary of the slice: {len(vocab)} tokens")
    cand_feats = None
    if cfg.style_head and cfg.space == "style":
        from edgecloud.personal.anon import style

        cand_feats = style.candidate_features(ds)
        log(f"candidate style features: {tuple(cand_feats.shape)}")
    per_seed = []
    for seed in cfg.seeds:
        basis = device.fit_basis(msg_feats, cfg.dim, cfg.anchors, space_fp, seed=seed)
        rows = {}
        for name, kind, sigma in arms(cfg):
            ta = time.time()
            table = kind == "static" and cfg.static == "table"
            model = cloud.CloudModel(lm, cfg.cloud, cfg.dim, hmean, hstd, n_users=U if table else 0, seed=seed)
            dists = None
            if kind in ("gaussian", "mixture"):
                dists = fit_users(kind, sigma, cfg, msg_feats, msg_users, U, basis)
            elif kind == "static" and not table:  # the user's own mean, never pulled in, never noised: an identifier
                dists = fit_users("gaussian", 0.0, cfg, msg_feats, msg_users, U, basis, radius=float("inf"))

            def embed(idx, users, gen, kind=kind, model=model, dists=dists, basis=basis):
                if kind == "none":
                    return torch.zeros(len(users), cfg.dim)
                if dists is None:
                    return model.table(users)
                return device.sample_many(dists, users, basis, gen)

            tr = cloud.train_model(model, train, tr_users, embed, seed, vocab)
            ref = None
            if cfg.contrast and kind != "none":  # the mean upload of the training window: no identity needed
                with torch.no_grad():
                    ref = embed(None, tr_users, torch.Generator().manual_seed(seed + 31)).mean(0, keepdim=True)
            ev = cloud.evaluate(model, evals, ev_users, embed, seed, vocab, ref=ref)
            if cand_feats is not None:
                ev |= critic_eval(cfg, basis, msg_feats, msg_users, cand_feats, ev_users, embed, seed)
            gen = torch.Generator().manual_seed(seed + 104729)
            later_users = torch.arange(U).repeat_interleave(cfg.attack_uploads)
            with torch.no_grad():
                z_win = embed(None, tr_users, gen).numpy()
                z_later = embed(None, later_users, gen).numpy()
            row = {"arm": name, "kind": kind, "sigma": sigma, **ev,
                   "attack_top1": attack.classifier_top1(z_win, tr_users.numpy(), z_later, later_users.numpy(), seed),
                   **{f"link_{k}": v for k, v in attack.linker(z_later, later_users.numpy(), U, seed).items()},
                   "train": tr, "wall_s": round(time.time() - ta, 1)}
            if dists is not None and kind != "static":
                row["embed_ms"] = embed_time_ms(dists[0], basis)
            rows[name] = row
            head = f"gaussian s={cfg.headline_sigma:g}"
            if on_seed is not None and not per_seed and {"none", "static", head} <= rows.keys():
                on_seed(summarize(cfg, ds, [rows], time.time() - t0))  # the first seed's arms so far
            log(f"seed {seed} {name}: acc {ev['acc']:.3f} contrast {ev.get('acc_contrast', ev['acc']):.3f} "
                f"style head {ev.get('acc_critic', float('nan')):.3f} "
                f"loss {ev['lm_loss']:.3f} attack {row['attack_top1']:.3f} "
                f"link {row['link_top1']:.3f} ({row['wall_s']} s)")
        per_seed.append(rows)
        if on_seed is not None:
            on_seed(summarize(cfg, ds, per_seed, time.time() - t0))
    return summarize(cfg, ds, per_seed, time.time() - t0)


def critic_eval(cfg: BenchConfig, basis, msg_feats, msg_users, cand_feats, ev_users, embed, seed: int) -> dict:
    """The style head of one arm: trained on the arm's uploads (each history message with a fresh embedding),
    then every held-out request (a fresh embedding) ranks its candidates."""
    gen = torch.Generator().manual_seed(seed + 271)
    with torch.no_grad():
        z_up, z_req = embed(None, msg_users, gen), embed(None, ev_users, gen)
    w = critic.train(basis.coords(msg_feats), z_up.detach(), cfg.critic_cfg, seed)
    cc = basis.coords(cand_feats.reshape(-1, cand_feats.shape[-1])).view(*cand_feats.shape[:2], -1)
    h = critic.hits(w, cc, z_req.detach())
    return {"acc_critic": sum(h) / len(h), "hits_critic": h}


def _ms(vals: list[float]) -> dict:
    a = np.array(vals, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def gain_recovered(acc_anon: float, acc_none: float, acc_static: float) -> float | None:
    d = acc_static - acc_none
    return (acc_anon - acc_none) / d if d > 0 else None


def paired_gain(per_seed: list[dict], arm: str, base: str = "none", key: str = "hits") -> dict | None:
    """Accuracy of ``arm`` minus ``base`` with a paired bootstrap interval over held-out examples (each example's
    hit averaged over the seeds first, so the interval is over examples, not over seeds)."""
    from edgecloud.personal.anon.oracle import paired_diff

    if any(key not in s[arm] or "hits" not in s[base] for s in per_seed):
        return None
    return paired_diff(np.mean([s[arm][key] for s in per_seed], 0), np.mean([s[base]["hits"] for s in per_seed], 0))


def summarize(cfg: BenchConfig, ds, per_seed: list[dict], wall: float) -> dict:
    U = len(ds.user_ids)
    chance = 1.0 / U
    names = list(per_seed[0])
    table = []
    for n in names:
        rs = [s[n] for s in per_seed]
        gains = [gain_recovered(r["acc"], s["none"]["acc"], s["static"]["acc"]) for r, s in zip(rs, per_seed)]
        row = {"arm": n, "kind": rs[0]["kind"], "sigma": rs[0]["sigma"]}
        for k in ("acc", "lm_loss", "ppl", "attack_top1", "link_top1", "link_ari"):
            row[k] = _ms([r[k] for r in rs])
        # the none arm has no identity to contrast: its contrast accuracy is its plain accuracy
        row["acc_contrast"] = _ms([r.get("acc_contrast", r["acc"]) for r in rs])
        if "acc_critic" in rs[0]:
            row["acc_critic"] = _ms([r["acc_critic"] for r in rs])
        row["gain_recovered"] = _ms([g for g in gains if g is not None]) if any(g is not None for g in gains) \
            else None
        if "embed_ms" in rs[0]:
            row["embed_ms"] = _ms([r["embed_ms"] for r in rs])
        table.append(row)
    by = {r["arm"]: r for r in table}
    head = by[f"gaussian s={cfg.headline_sigma:g}"]
    mixture = by.get("mixture")
    ok = [r for r in table if r["kind"] in ("gaussian", "mixture") and r["attack_top1"]["mean"] <= chance + 0.05]
    best = max(ok, key=lambda r: r["acc"]["mean"]) if ok else None
    return {
        "users": U, **{k: v for k, v in ds.summary().items() if k != "users"},
        "seeds": list(cfg.seeds[:len(per_seed)]),
        "acc_no_embedding": by["none"]["acc"]["mean"],
        "acc_static_id": by["static"]["acc"]["mean"],
        "acc_anonymous": head["acc"]["mean"],
        "anonymous_arm": head["arm"],
        "gain_recovered": head["gain_recovered"]["mean"] if head["gain_recovered"] else None,
        "attack_top1": head["attack_top1"]["mean"],
        "attack_link_top1": head["link_top1"]["mean"],
        "attack_chance": chance,
        "static_gain": paired_gain(per_seed, "static"), "anonymous_gain": paired_gain(per_seed, head["arm"]),
        "acc_static_id_contrast": by["static"]["acc_contrast"]["mean"],
        "acc_anonymous_contrast": head["acc_contrast"]["mean"],
        "gain_recovered_contrast": gain_recovered(head["acc_contrast"]["mean"], by["none"]["acc"]["mean"],
                                                  by["static"]["acc_contrast"]["mean"]),
        "static_gain_contrast": paired_gain(per_seed, "static", key="hits_contrast"),
        "anonymous_gain_contrast": paired_gain(per_seed, head["arm"], key="hits_contrast"),
        **critic_summary(per_seed, by, head),
        "acc_mixture": mixture["acc"]["mean"] if mixture else None,
        "attack_top1_mixture": mixture["attack_top1"]["mean"] if mixture else None,
        "best_private_arm": best["arm"] if best else None,
        "best_private_acc": best["acc"]["mean"] if best else None,
        "goal_met": bool(head["gain_recovered"] and head["gain_recovered"]["mean"] >= 0.5
                         and head["attack_top1"]["mean"] <= chance + 0.05),
        "embed_ms": head.get("embed_ms", {}).get("mean"),
        "arms": table,
        "per_seed": per_seed,
        "config": asdict(cfg),
        "bench_wall_s": round(wall, 1),
    }


def critic_summary(per_seed: list[dict], by: dict, head: dict) -> dict:
    """The style head's accuracies, gains over none (paired intervals) and the fraction of the static gain the
    anonymous arm recovers; empty when the run had no style head."""
    if "acc_critic" not in by["none"]:
        return {}
    acc = {k: by[k]["acc_critic"]["mean"] for k in ("none", "static", head["arm"])}
    return {"acc_no_embedding_critic": acc["none"], "acc_static_id_critic": acc["static"],
            "acc_anonymous_critic": acc[head["arm"]],
            "gain_recovered_critic": gain_recovered(acc[head["arm"]], acc["none"], acc["static"]),
            "static_gain_critic": paired_critic(per_seed, "static"),
            "anonymous_gain_critic": paired_critic(per_seed, head["arm"])}


def paired_critic(per_seed: list[dict], arm: str) -> dict:
    from edgecloud.personal.anon.oracle import paired_diff

    return paired_diff(np.mean([s[arm]["hits_critic"] for s in per_seed], 0),
                       np.mean([s["none"]["hits_critic"] for s in per_seed], 0))


def _frac(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _ci(g: dict | None) -> str:
    return f"{g['diff']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]" if g else "—"


def to_result(d: dict, name: str = "anonymous_embeddings"):
    """The shared results layer's Result: table per arm (mean ± std over seeds) and the trade-off plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgecloud.results import Result

    res = Result(name, d, seed=d["seeds"][0] if d["seeds"] else None,
                 title="Anonymous user embeddings (IDfree-PL): personalization vs attribution")
    pm = lambda m: f"{m['mean']:.3f} ± {m['std']:.3f}"  # noqa: E731
    res.markdown = (f"{d['users']} chitchat users, {d['train_examples']} training / {d['eval_examples']} held-out "
                    f"examples (split in time), reply selection among {d['candidates']} candidates; seeds "
                    f"{d['seeds']} (mean ± std). Attribution chance = 1/{d['users']} = {d['attack_chance']:.3f}; "
                    f"the goal bound is chance + 0.05 = {d['attack_chance'] + 0.05:.3f}. Accuracy gain over no "
                    f"embedding, paired bootstrap 95% interval over held-out examples: static ID "
                    f"{_ci(d.get('static_gain'))}, {d['anonymous_arm']} {_ci(d.get('anonymous_gain'))}; "
                    f"contrast ranking: static ID {_ci(d.get('static_gain_contrast'))}, {d['anonymous_arm']} "
                    f"{_ci(d.get('anonymous_gain_contrast'))}; style head: static ID {_ci(d.get('static_gain_critic'))}"
                    f", {d['anonymous_arm']} {_ci(d.get('anonymous_gain_critic'))}, static-ID gain recovered "
                    f"{_frac(d.get('gain_recovered_critic'))}.\n")
    rows = [{"arm": a["arm"], "acc": pm(a["acc"]), "accc": pm(a["acc_contrast"]) if "acc_contrast" in a else "—",
             "loss": pm(a["lm_loss"]), "ppl": f"{a['ppl']['mean']:.1f}",
             "attack": pm(a["attack_top1"]), "link": pm(a["link_top1"]), "ari": f"{a['link_ari']['mean']:.3f}",
             "gain": pm(a["gain_recovered"]) if a.get("gain_recovered") else "—",
             "head": pm(a["acc_critic"]) if "acc_critic" in a else "—"} for a in d["arms"]]
    res.table(rows, ["arm", "acc", "accc", "head", "loss", "ppl", "attack", "link", "ari", "gain"],
              ["arm", "reply-selection acc ↑", "acc, contrast ranking ↑", "acc, style head ↑", "held-out LM loss ↓",
               "ppl ↓",
               "attack top-1 (classifier) ↓",
               "attack top-1 (k-means linker) ↓", "linker ARI", "static-ID gain recovered"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    g = [a for a in d["arms"] if a["kind"] == "gaussian"]
    ax.errorbar([a["attack_top1"]["mean"] for a in g], [a["acc"]["mean"] for a in g],
                xerr=[a["attack_top1"]["std"] for a in g], yerr=[a["acc"]["std"] for a in g], marker="o",
                label="anonymous, close distributions (sigma sweep)")
    for a in g:
        ax.annotate(f"σ={a['sigma']:g}", (a["attack_top1"]["mean"], a["acc"]["mean"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    for a, m in ((x, mk) for x in d["arms"] for mk, k in (("s", "mixture"), ("*", "static"), ("x", "none"))
                 if x["kind"] == k):
        ax.errorbar(a["attack_top1"]["mean"], a["acc"]["mean"], xerr=a["attack_top1"]["std"],
                    yerr=a["acc"]["std"], marker=m, ms=9, ls="", label=a["arm"])
    ax.axvline(d["attack_chance"], color="gray", ls=":", label="chance")
    ax.axvspan(0, d["attack_chance"] + 0.05, color="green", alpha=0.08, label="goal: ≤ chance + 5 pts")
    ax.set_xlabel("attribution top-1 (classifier on a labelled window)")
    ax.set_ylabel("reply-selection accuracy (10 candidates)")
    ax.set_xlim(0, 1.05)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Accuracy vs attribution as the embedding variance grows", fontsize=10)
    fig.tight_layout()
    res.figure = fig
    return res


CONTRACT = ("users", "acc_no_embedding", "acc_static_id", "acc_anonymous", "gain_recovered", "attack_top1",
            "attack_chance")
