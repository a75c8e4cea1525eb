"""The CSR comparison in one run: fp16, KIVI-2/4 and CSR (k-means vs NeuralDict, MP vs OMP, several sparsities)
on SmolLM2-135M over held-out pydoc text — bits per element, perplexity, top-1 agreement with fp16, codec time."""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from edgecloud.errors import UserError
from edgecloud.kvcache.csr import coding, dictionary, keyprep
from edgecloud.kvcache.csr.cache import CacheSpec, cache_bits_per_element, cache_timing, index_bits, make_cache
from edgecloud.kvcache.csr.coding import CODERS, QUANTS, STORE, reconstruct
from edgecloud.kvcache.csr.dictionary import CSRDictionaries, DictConfig, chunk, learn_dictionaries, train_dictionary
from edgecloud.kvcache.csr.qa import QAConfig, qa_compare
from edgecloud.llm.corpus import token_windows, topic_split
from edgecloud.llm.engine import Engine
from edgecloud.paths import cache_root
from edgecloud.results import code_key


@dataclass(frozen=True)
class BenchConfig:
    seq_len: int = 512  # held-out context per sequence
    eval_seqs: int = 1
    chunk: int = 64  # tokens per forward: prefill arrives in chunks, each encoded as it arrives
    # dictionaries (shared by both presets, so the quick run reuses the full run's cached dictionaries)
    calib_seqs: int = 8  # calibration windows (pydoc topics not held out)
    calib_len: int = 512
    val_seqs: int = 2  # further windows: held-out set for early stopping and the coder comparison
    atoms: int = 4096
    sizes: tuple[int, ...] = (4096, 8192, 16384)  # size sweep on one layer group (full preset)
    sweep_steps: int = 20  # NeuralDict steps per size in the sweep
    coder_vectors: int = 256  # held-out vectors per layer in the coder comparison
    steps: int = 40  # most NeuralDict steps; early stopping on the held-out error may end sooner
    lr: float = 3e-4
    batch: int = 128
    group: int = 3  # target layers per shared dictionary (boundaries by JSD)
    chunk_dim: int = 64  # channels per coded chunk (s_n = head_dim / chunk_dim)
    kmeans_iters: int = 6
    kmeans_sample: int = 8192
    # the main CSR setting: the bit budget, weight precision, packed indices, keys' share of the atoms
    bits: float = 2.0
    coef: str = "fp8"
    packed: bool = True
    keys_share: float = 1 / 3
    residual: int = 32  # dense recent tokens for KIVI (its paper's design)
    group_kivi: int = 32
    sink: int = 4  # CSR: the first tokens kept fp16 (attention sinks), their bytes counted in bits/element
    keyprep: str = ""  # keys before coding: "" as they are, "center" (- channel mean), "center+qscale" (see keyprep)
    rows: tuple[str, ...] = ()  # perplexity rows to run (names as in the table; empty: all)
    coders: bool = True  # the MP/OMP coder comparison (calibrates the held-out vectors: minutes on Gemma)
    seed: int = 0

    @classmethod
    def quick(cls, seed: int = 0) -> BenchConfig:
        return cls(seq_len=512, eval_seqs=1, sizes=(), seed=seed)

    def __post_init__(self):
        if self.bits <= 0 or not 0 < self.keys_share < 1:
            raise UserError(f"bits={self.bits}, keys_share={self.keys_share}: need bits > 0 and 0 < share < 1")
        if not 0 <= self.sink < self.seq_len:
            raise UserError(f"sink={self.sink}: use 0 <= sink < seq_len ({self.seq_len})")
        if self.keyprep not in keyprep.MODES:
            raise UserError(f"keyprep={self.keyprep!r}: use one of {', '.join(repr(m) for m in keyprep.MODES)}")


# per-model settings of the measured runs (docs/csr.md): Gemma-3-270M shares a dictionary over ~6 layers, codes
# centred, query-scaled keys (keyprep) over k-means dictionaries, and keeps 3 fp16 sinks so that codes + sinks + the
# counted key mean/scale stay <= 2 bits/element at 512 tokens
PRESETS: dict[str, dict] = {"gemma3-270m": {"group": 6, "keyprep": "center+qscale", "sink": 3, "steps": 0}}


def preset(cfg: BenchConfig, model: str) -> BenchConfig:
    """``cfg`` with ``model``'s measured settings (PRESETS); other models keep the defaults."""
    return replace(cfg, **PRESETS.get(model, {}))


def calibrate(engine: Engine, ids: torch.Tensor, pre_rope: bool = True) -> dict[str, torch.Tensor]:
    """Keys and values per layer exactly as the cache receives them (read back from a cache, so QK-norm and any
    per-layer RoPE are the model's own), keys un-rotated to pre-RoPE: (L, windows·kv_heads·tokens, d)."""
    from transformers import DynamicCache

    store: dict[str, list[list[torch.Tensor]]] = {"keys": [[] for _ in range(engine.n_layers)],
                                                  "values": [[] for _ in range(engine.n_layers)]}
    with torch.no_grad():
        for row in ids:
            cache = DynamicCache()
            engine.model(row[None], cache=cache, use_cache=True, logits_to_keep=1)
            pos = torch.arange(len(row))
            for li, layer in enumerate(cache.layers):
                k, v = layer.keys[0], layer.values[0]  # (kv_heads, T, d), post-RoPE keys
                if pre_rope:
                    k = engine.pre_rope_keys(k, pos, li)
                store["keys"][li].append(k.reshape(-1, k.shape[-1]))
                store["values"][li].append(v.reshape(-1, v.shape[-1]))
    return {k: torch.stack([torch.cat(v) for v in store[k]]) for k in store}


def dictionary_code_version() -> str:
    """The source of everything that computes a dictionary (calibration, k-means/NeuralDict, coders): a change to
    any of it changes the cache key, so an edit never serves a dictionary the new code would not learn."""
    return code_key(inspect.getsource(calibrate), inspect.getsource(dictionary), inspect.getsource(coding))


def head_dim(engine: Engine) -> int:
    c = engine.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def budget(cfg: BenchConfig, n_atoms: int, bits: float | None = None, coef: str | None = None,
           packed: bool | None = None) -> tuple[int, int]:
    """(keys, values) atoms per ``chunk_dim``-channel chunk that fit ``bits`` per element, every stored bit
    counted (index + weight per atom); a budget the coder cannot meet is a UserError."""
    bits = cfg.bits if bits is None else bits
    coef = cfg.coef if coef is None else coef
    packed = cfg.packed if packed is None else packed
    per_atom = (index_bits(n_atoms) if packed else 16) + 8 * STORE[coef].itemsize
    total = int(2 * cfg.chunk_dim * bits // per_atom)
    if total < 2:
        raise UserError(f"--bits {bits}: CSR with N={n_atoms} atoms stores {per_atom} bits per atom, so one key and "
                        f"one value atom per {cfg.chunk_dim}-channel chunk need >= {per_atom / cfg.chunk_dim:.3f} "
                        "bits/element; raise --bits")
    sk = min(total - 1, max(1, round(total * cfg.keys_share)))
    return sk, total - sk


def dict_configs(cfg: BenchConfig, hd: int, n_atoms: int, steps: int) -> tuple[DictConfig, DictConfig]:
    if hd % cfg.chunk_dim:
        raise UserError(f"head dimension {hd} is not a multiple of chunk_dim={cfg.chunk_dim}")
    sk, sv = budget(cfg, n_atoms)
    common = dict(n_atoms=n_atoms, s_n=hd // cfg.chunk_dim, group=cfg.group, steps=steps, batch=cfg.batch,
                  lr=cfg.lr, kmeans_iters=cfg.kmeans_iters, kmeans_sample=cfg.kmeans_sample, coef=cfg.coef,
                  seed=cfg.seed)
    return DictConfig(s=sk, **common), DictConfig(s=sv, **common)


def dictionary_path(engine: Engine, cfg: BenchConfig, n_atoms: int, steps: int) -> tuple[Path, str]:
    """Cache file of one dictionary setting: keyed by model fingerprint + dictionary/calibration config + the
    code version (so an edit to the code that computes dictionaries never serves an old file)."""
    ck, cv = dict_configs(cfg, head_dim(engine), n_atoms, steps)
    version = dictionary_code_version()
    # prepared keys are other training data: their mode and code join the key (none: the key stays as before)
    prep = (cfg.keyprep, inspect.getsource(keyprep)) if cfg.keyprep else ()
    key = code_key(engine.lm.fingerprint, asdict(ck), asdict(cv), cfg.calib_seqs, cfg.calib_len, cfg.val_seqs,
                   *prep, version=version)
    return cache_root() / "csr" / f"dict-{key}.safetensors", version


def get_dictionaries(engine: Engine, kv, cfg: BenchConfig, n_atoms: int, steps: int,
                     log=print, extra_meta=dict) -> tuple[CSRDictionaries, dict]:
    """Learned (or k-means when steps=0) dictionaries from the cache, else trained and saved with their training
    command, curves and layer groups in the metadata. ``kv`` is a zero-argument function returning
    (calibration, held-out) vectors, so a cached run never calibrates; ``extra_meta()`` (called after ``kv``) adds
    to the metadata (the key mean/scale of ``cfg.keyprep``)."""
    path, version = dictionary_path(engine, cfg, n_atoms, steps)
    hd = head_dim(engine)
    if path.exists():
        d = CSRDictionaries.load(path, engine.lm.fingerprint, engine.n_layers, hd, version)
        return d, {"cached": str(path), **{k: d.meta.get(k) for k in ("train_s", "curves", "command")}}
    ck, cv = dict_configs(cfg, hd, n_atoms, steps)
    train, val = kv()
    t0 = time.perf_counter()
    d, info = learn_dictionaries(train, ck, cv, engine.lm.fingerprint, True, val, log=log)
    d.meta = {"version": version, "command": command_line(),
              "n_layers": engine.n_layers, "head_dim": hd, "train_s": time.perf_counter() - t0,
              "calibration_vectors": int(train["keys"].shape[1]),
              "curves": {k: v["curve"] for k, v in info.items()}, "jsd": {k: v["jsd"] for k, v in info.items()},
              **extra_meta()}
    path.parent.mkdir(parents=True, exist_ok=True)
    d.save(path)
    return d, {"trained": str(path), **{k: d.meta[k] for k in ("train_s", "curves", "command")}}


def command_line() -> str:
    """The command that is running, as a user would type it (recorded with every trained dictionary)."""
    argv = list(sys.argv)
    if not argv:
        return ""
    head = "python " + argv[0] if argv[0].endswith(".py") else "edgecloud"
    return " ".join([head, *argv[1:]])


def coder_comparison(dicts: dict[str, CSRDictionaries], kv_test: dict, cfg: BenchConfig) -> list[dict]:
    """Relative reconstruction error and encode µs per vector for MP / OMP on held-out KV vectors, per dictionary
    (each at its own main budget); the µs are per vector per layer, all chunks, one thread."""
    rows = []
    for dname, dct in dicts.items():
        for kind, dc in (("keys", dct.cfg_keys), ("values", dct.cfg_values)):
            x_all = kv_test[kind][:, : cfg.coder_vectors]  # (L, M, d)
            L, M, d = x_all.shape
            coders = CODERS if dname in ("kmeans", "neuraldict") else {"mp": CODERS["mp"]}
            for coder, fn in coders.items():
                err_num = err_den = dt = 0.0
                for gi in range(getattr(dct, kind).shape[0]):
                    layers = [li for li in range(L) if dct.group_of(kind, li) == gi]
                    D = getattr(dct, kind)[gi]  # (s_n, N, dc)
                    x = chunk(x_all[layers].reshape(-1, d), dc.s_n)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        idx, coef = fn(x, D, dc.s, QUANTS[dc.coef])
                    dt += time.perf_counter() - t0
                    err_num += float((reconstruct(D, idx, coef) - x).pow(2).sum())
                    err_den += float(x.pow(2).sum())
                rows.append({"dictionary": dname, "kind": kind, "coder": coder, "atoms": dc.n_atoms, "s": dc.s,
                             "s_n": dc.s_n, "rel_err": err_num / err_den, "us_per_vector": 1e6 * dt / (L * M)})
    return rows


def evaluate(engine: Engine, windows: torch.Tensor, spec: CacheSpec, dicts, cfg: BenchConfig,
             ref_top1: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """Perplexity / agreement / bits for one cache setting; the context is fed in ``cfg.chunk``-token pieces."""
    nll, n, bits, enc, dec = 0.0, 0, [], [], []
    tops = []
    for w in windows:
        cache = make_cache(spec, engine.n_layers, dicts, engine, seed=cfg.seed)
        logits = []
        with torch.no_grad():
            for i in range(0, len(w), cfg.chunk):
                logits.append(engine.model(w[None, i:i + cfg.chunk], cache=cache, use_cache=True).logits[0])
        logits = torch.cat(logits)
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum"))
        n += len(w) - 1
        tops.append(logits.argmax(-1))
        bits.append(cache_bits_per_element(cache))
        t = cache_timing(cache)
        enc.append(t["encode_s"])
        dec.append(t["decode_s"])
    top = torch.stack(tops)
    row = {"method": spec.label, "bits_per_element": sum(bits) / len(bits), "ppl": float(torch.exp(torch.tensor(
        nll / n))), "top1_agreement": 1.0 if ref_top1 is None else float((top == ref_top1).float().mean()),
        "encode_us_per_token": 1e6 * sum(enc) / len(enc), "decode_us_per_token": 1e6 * sum(dec) / len(dec)}
    return row, top


def size_sweep(engine: Engine, train: dict, val: dict, cfg: BenchConfig, log=print) -> list[dict]:
    """Dictionary sizes on one layer group (the middle ``cfg.group`` layers): k-means then NeuralDict at each N of
    ``cfg.sizes``, each at its own <= ``cfg.bits`` budget; held-out error and MP encode time per vector. Encode
    µs/token = µs/vector x layers x KV heads (every layer codes each token's key and value for every KV head)."""
    hd = head_dim(engine)
    L = engine.n_layers
    layers = list(range((L - cfg.group) // 2, (L - cfg.group) // 2 + cfg.group))
    rows = []
    for n in cfg.sizes:
        ck, cv = dict_configs(cfg, hd, n, cfg.sweep_steps)
        for kind, dc in (("keys", ck), ("values", cv)):
            x = chunk(train[kind][layers].reshape(-1, hd), dc.s_n)
            xv = chunk(val[kind][layers].reshape(-1, hd), dc.s_n)
            t0 = time.perf_counter()
            # k-means needs more vectors than atoms: sample at least 2N, fewer iterations at the large sizes
            dc = replace(dc, eval_every=max(1, cfg.sweep_steps // 2), kmeans_sample=max(cfg.kmeans_sample, 2 * n),
                         kmeans_iters=max(2, cfg.kmeans_iters * 4096 // (2 * n)))
            D, curve = train_dictionary(x, dc, xv)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            err = dictionary.rel_error(xv, D, dc.s, dc.coef)
            us = 1e6 * (time.perf_counter() - t0) / xv.shape[1]
            rows.append({"atoms": n, "kind": kind, "s": dc.s, "s_n": dc.s_n, "layers": layers,
                         "bits_per_element": dc.s * dc.s_n * (index_bits(n) + 8 * STORE[dc.coef].itemsize) / hd,
                         "rel_err_kmeans": curve[0]["heldout"], "rel_err": err, "curve": curve,
                         "train_vectors": int(x.shape[1]), "us_per_vector": us,
                         "encode_us_per_token": us * L * engine.config.num_key_value_heads, "train_s": train_s})
            log(f"size {n} {kind}: k-means {curve[0]['heldout']:.4f} -> {err:.4f}, {us:.0f} us/vector")
    return rows


def _by_head(x: torch.Tensor, T: int, H: int) -> torch.Tensor:
    """calibrate's (L, windows·H·T, d) rows -> (L, H, windows·T, d)."""
    L, _, d = x.shape
    return x.reshape(L, -1, H, T, d).transpose(1, 2).reshape(L, H, -1, d)


def fit_keyprep(keys: torch.Tensor, queries: dict[int, list[torch.Tensor]], cfg: BenchConfig) -> keyprep.KeyPrep:
    """The key mean/scale from the calibration windows' keys (L, windows·H·T, d) and their captured queries."""
    H = keys.shape[1] // (cfg.calib_seqs * cfg.calib_len)
    q = torch.stack([torch.cat(queries[li][: cfg.calib_seqs], 1) for li in range(keys.shape[0])])
    return keyprep.fit(_by_head(keys, cfg.calib_len, H), q, cfg.keyprep)


def prep_flat(prep: keyprep.KeyPrep, keys: torch.Tensor, T: int) -> torch.Tensor:
    """Apply ``prep`` to calibrate-layout keys (L, windows·H·T, d), layer by layer, keeping the layout."""
    L, M, d = keys.shape
    H = prep.mean.shape[1]
    x = keys.reshape(L, -1, H, T, d)
    return ((x - prep.mean[:, None, :, None]) * prep.scale[:, None, :, None]).reshape(L, M, d)


def prepare(engine: Engine, cfg: BenchConfig, log=print,
            dict_file: Path | None = None) -> tuple[dict[str, CSRDictionaries], dict, Callable]:
    """Every dictionary the comparison uses (from the cache, else trained): NeuralDict and its k-means start at
    ``cfg.atoms``, NeuralDict at each of ``cfg.sizes``. Calibrates only if something must be trained.
    Returns (dictionaries by name, training info by name, a function giving (calibration, held-out) vectors)."""
    lm = engine.lm
    calib_text, _ = topic_split()
    state: dict = {}

    def vectors():
        if not state:
            ids = token_windows(lm.tokenizer, calib_text, cfg.calib_len, cfg.calib_seqs + cfg.val_seqs)
            t0 = time.perf_counter()
            with keyprep.capture_queries(engine, on="qscale" in cfg.keyprep) as queries:
                kv = calibrate(engine, ids)
            n_val = cfg.val_seqs * cfg.calib_len * engine.config.num_key_value_heads
            if cfg.keyprep:  # fitted on the calibration windows only, then applied to calibration and held-out keys
                prep = fit_keyprep(kv["keys"][:, :-n_val], queries, cfg)
                kv["keys"] = prep_flat(prep, kv["keys"], cfg.calib_len)
                state["meta"] = prep.to_meta()
            state["train"] = {k: v[:, :-n_val] for k, v in kv.items()}
            state["val"] = {k: v[:, -n_val:] for k, v in kv.items()}
            log(f"calibrated {state['train']['keys'].shape[1]} + {n_val} held-out vectors/layer "
                f"in {time.perf_counter() - t0:.0f}s")
        return state["train"], state["val"]

    dicts, info = {}, {}
    plan = [("neuraldict", cfg.atoms, cfg.steps), ("kmeans", cfg.atoms, 0)]
    for name, n, steps in plan:
        log(f"dictionary {name}: N={n}")
        if name == "kmeans" and steps == cfg.steps and dict_file is None:  # steps=0: the same file, one object
            dicts[name], info[name] = dicts["neuraldict"], info["neuraldict"]
            continue
        if name == "neuraldict" and dict_file is not None:  # a given file: checked like a cached one
            dicts[name] = CSRDictionaries.load(dict_file, lm.fingerprint, engine.n_layers, head_dim(engine),
                                               dictionary_code_version())
            info[name] = {"file": str(dict_file), "command": dicts[name].meta.get("command")}
            continue
        dicts[name], info[name] = get_dictionaries(engine, vectors, cfg, n, steps, log,
                                                   lambda: state.get("meta", {}))
    return dicts, info, vectors


def contract_specs(cfg: BenchConfig, neural: CSRDictionaries) -> dict[str, tuple[CacheSpec, CSRDictionaries | None]]:
    """The four settings every report compares (fp16, KIVI-2/4 with their fp16 recent window, CSR at ``cfg.bits``
    with ``cfg.sink`` fp16 sinks over ``neural``), fp16 first: the perplexity table and the QA run use the same."""
    csr = CacheSpec("csr", s_keys=neural.cfg_keys.s, s_values=neural.cfg_values.s, coef=cfg.coef, packed=cfg.packed,
                    sink=cfg.sink, name="csr")
    return {"fp16": (CacheSpec("fp16", name="fp16"), None),
            "kivi2": (CacheSpec("kivi", bits=2, group=cfg.group_kivi, residual=cfg.residual, name="kivi2"), None),
            "kivi4": (CacheSpec("kivi", bits=4, group=cfg.group_kivi, residual=cfg.residual, name="kivi4"), None),
            "csr": (csr, neural)}


def run(cfg: BenchConfig, engine: Engine, log=print, qa: QAConfig | None = None,
        dict_file: Path | None = None) -> dict:
    """The whole comparison on ``engine``: bits/element, perplexity, top-1 agreement and codec time for fp16,
    KIVI-2/4 and CSR (NeuralDict vs k-means, MP vs OMP, 1-4 bits, dictionary sizes), and with ``qa`` answer F1."""
    torch.manual_seed(cfg.seed)
    lm = engine.lm
    _, held_text = topic_split()
    dicts, train_info, vectors = prepare(engine, cfg, log, dict_file)
    coders = coder_comparison(dicts, vectors()[1], cfg) if cfg.coders else []
    sizes = size_sweep(engine, *vectors(), cfg, log) if cfg.sizes else []
    neural, kmeans = dicts["neuraldict"], dicts["kmeans"]
    sk, sv = neural.cfg_keys.s, neural.cfg_values.s
    main_specs = contract_specs(cfg, neural)
    base = main_specs["csr"][0]

    def at(bits: float, name: str) -> tuple[CacheSpec, CSRDictionaries]:
        k, v = budget(cfg, cfg.atoms, bits)
        return replace(base, s_keys=k, s_values=v, name=name), neural

    k16, v16 = budget(cfg, cfg.atoms, cfg.bits, coef="fp16", packed=False)
    settings: list[tuple[CacheSpec, CSRDictionaries | None]] = [
        *main_specs.values(),
        (replace(base, sink=0, name="csr-nosink"), neural),  # last session's main setting: every token coded
        (replace(base, name="csr-kmeans"), kmeans),
        (replace(base, coder="omp", name="csr-omp"), neural),
        # the former storage at the same budget: int16 index + fp16 weight = 32 bits an atom, so fewer atoms
        (replace(base, s_keys=k16, s_values=v16, coef="fp16", packed=False, name="csr-int16-fp16"), neural),
        at(1.0, "csr-1bit"), at(3.0, "csr-3bit"), at(4.0, "csr-4bit"),
        # the same atoms moved from values to keys (Gemma's error is in its keys: values alone cost ~nothing)
        (replace(base, s_keys=(sk + sv) // 2, s_values=sk + sv - (sk + sv) // 2, name="csr-even-split"), neural),
        (replace(base, s_keys=sv, s_values=sk, name="csr-keys-heavy"), neural),
        # KIVI's recent-token window given to CSR too, paid for with 1-bit codes on the older tokens
        (replace(at(1.0, "")[0], residual=cfg.residual, name=f"csr-1bit-r{cfg.residual}"), neural),
    ]
    main = ("fp16", "kivi2", "kivi4", "csr", "csr-kmeans")  # the verdict and the contract keys need these
    settings = [(sp, d) for sp, d in settings if not cfg.rows or sp.name in cfg.rows or sp.name in main]
    if cfg.keyprep:  # the same setting over dictionaries of raw keys (cached or trained): keyprep's paired effect
        raw = prepare(engine, replace(cfg, keyprep=""), log)[0]["neuraldict"]
        settings.append((replace(base, name="csr-rawkeys"), raw))
    windows = token_windows(lm.tokenizer, held_text, cfg.seq_len, cfg.eval_seqs)
    rows, ref = [], None
    done: dict = {}
    for spec, d in settings:
        t0 = time.perf_counter()
        same = done.get((replace(spec, name=""), id(d)))  # steps=0: NeuralDict is its k-means start, one evaluation
        row, top = ({**same[0], "method": spec.label}, same[1]) if same else evaluate(engine, windows, spec, d, cfg,
                                                                                       ref)
        done[(replace(spec, name=""), id(d))] = (row, top)
        if ref is None:
            ref = top
        row["atoms"] = d.cfg_keys.n_atoms if d is not None else None
        row["s_keys"], row["s_values"] = (spec.s_keys, spec.s_values) if spec.method == "csr" else (None, None)
        row["sink"], row["residual"] = spec.sink, spec.residual  # fp16 first / most recent tokens (counted)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        log(f"{row['method']:>14}: {row['bits_per_element']:.3f} bits  ppl {row['ppl']:.3f}  "
            f"top1 {row['top1_agreement']:.4f}  ({row['wall_s']:.0f}s)")
    by = {r["method"]: r for r in rows}
    out = {
        "bits_per_element_csr": by["csr"]["bits_per_element"],
        "bits_per_element_kivi2": by["kivi2"]["bits_per_element"],
        "ppl_fp16": by["fp16"]["ppl"], "ppl_csr": by["csr"]["ppl"], "ppl_kivi2": by["kivi2"]["ppl"],
        "ppl_kivi4": by["kivi4"]["ppl"],
        "top1_agreement_csr": by["csr"]["top1_agreement"], "top1_agreement_kivi2": by["kivi2"]["top1_agreement"],
        "ppl_ratio_csr_over_kivi2": by["csr"]["ppl"] / by["kivi2"]["ppl"],
        "memory_ratio_csr_over_kivi2": by["csr"]["bits_per_element"] / by["kivi2"]["bits_per_element"],
        "ppl_ratio_neuraldict_over_kmeans": by["csr"]["ppl"] / by["csr-kmeans"]["ppl"],
        "encode_us_per_token_csr": by["csr"]["encode_us_per_token"],
        "atoms": cfg.atoms, "model": lm.fingerprint, "model_name": lm.name, "head_dim": head_dim(engine),
        "layers": engine.n_layers, "kv_heads": engine.config.num_key_value_heads,
        "layer_groups": {k: neural.groups.get(k) for k in ("keys", "values")},
        "rows": rows, "coders": coders, "sizes": sizes, "dictionary_training": train_info,
        "dictionary_bytes": {n: int((d.keys.numel() + d.values.numel()) * 2) for n, d in dicts.items()},
        "config": asdict(cfg), "eval_tokens": int(windows.numel()),
    }
    if qa is not None:
        out["qa"] = qa_compare(engine, main_specs, qa, cfg.seed, log)
        for src, r in out["qa"]["summary"].items():
            for m, v in r.items():
                out[f"f1_{src}_{m}"] = v["f1"]
    return out
