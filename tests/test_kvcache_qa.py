"""The gold-answer workload: QA file parsing (errors name file and line), SQuAD metrics, bootstrap intervals,
passkey items, and the prompt-length check, all without a model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from edgecloud.errors import UserError
from edgecloud.kvcache.bench import BenchConfig, make_workload
from edgecloud.kvcache.qa import QAItem, bootstrap_ci, contains, f1, load_qa_file, normalize, passkey_items


def test_squad_metrics_match_the_official_definitions():
    assert normalize("The  Denver Broncos!") == "denver broncos"
    assert f1("Denver Broncos", ["Denver Broncos"]) == 1.0
    # 2 common tokens: precision 2/4, recall 2/2 -> F1 2/3
    assert f1("the team Denver Broncos won", ["Denver Broncos"]) == pytest.approx(2 / 3)
    assert f1("Carolina", ["Denver Broncos"]) == 0.0
    assert f1("anything", ["x", "anything"]) == 1.0  # best over the gold answers
    assert contains("It was the Denver Broncos.", ["denver broncos"]) == 1.0
    assert contains("Denver", ["Denver Broncos"]) == 0.0


def test_bootstrap_ci_brackets_the_mean_and_is_seeded():
    x = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1] * 5
    lo, hi = bootstrap_ci(x, seed=3)
    assert lo < sum(x) / len(x) < hi and 0.5 < lo and hi < 0.9
    assert bootstrap_ci(x, seed=3) == (lo, hi)
    assert bootstrap_ci([1.0] * 8) == (1.0, 1.0)


def test_qa_file_roundtrip_and_errors_name_file_and_line(tmp_path):
    good = {"question": "Who?", "answers": ["Ada"], "context": "Ada wrote it.", "distractors": ["Bob ran."]}
    p = tmp_path / "qa.jsonl"
    p.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    items = load_qa_file(p)
    assert len(items) == 2 and items[0].answers == ["Ada"] and items[0].distractors == ["Bob ran."]
    p.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(UserError, match=r"qa.jsonl:2: not valid JSON"):
        load_qa_file(p)
    p.write_text(json.dumps({**good, "answers": []}) + "\n")
    with pytest.raises(UserError, match=r"qa.jsonl:1: 'answers'"):
        load_qa_file(p)
    with pytest.raises(UserError, match="cannot read"):
        load_qa_file(tmp_path / "missing.jsonl")


def test_passkey_plants_the_key_in_exactly_one_passage():
    items = passkey_items(4, 5, seed=1)
    for it in items:
        key = it.answers[0]
        assert f"The pass key is {key}" in it.gold and not any(key in d for d in it.distractors)
        assert len(it.distractors) >= 5
    assert passkey_items(4, 5, seed=1)[0].gold == items[0].gold  # seeded


def _word_engine(context: int):
    """Enough of an Engine for make_workload: whitespace tokens, a base-model template."""
    return SimpleNamespace(encode=lambda s: list(range(len(s.split()))), lm=SimpleNamespace(chat=False),
                           context=context)


def test_workload_holds_gold_among_distractors_and_rejects_overlong_prompts():
    items = [QAItem(f"q{i}?", ["a"], f"gold passage {i} " * 5, [f"other {j} " * 5 for j in range(6)], "g")
             for i in range(3)]
    cfg = BenchConfig(min_chunks=3, max_chunks=4, groups=0, passkey=0, per_group=1, answer_tokens=4)
    reqs = make_workload(_word_engine(4096), cfg, items)
    assert len(reqs) == 3 and all(3 <= r.n_chunks <= 4 for r in reqs)
    assert all(len(r.segments) == r.n_chunks + 2 for r in reqs)  # system + passages + question
    with pytest.raises(UserError, match="more than the model's context of 20"):
        make_workload(_word_engine(20), cfg, items)


def test_bad_bench_config():
    with pytest.raises(UserError, match="min_chunks"):
        BenchConfig(min_chunks=5, max_chunks=4)


def test_unreachable_peer_is_one_clear_error_before_any_compute(tmp_path):
    import socket
    import subprocess
    import sys

    from edgecloud.llm.peers import VLLMPeer
    from edgecloud.paths import REPO_ROOT

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(UserError, match=f"no OpenAI-compatible server answers at {url}"):
        VLLMPeer(url)
    r = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "mpic.py"), "--peer", "vllm", "--peer-url", url,
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"no OpenAI-compatible server answers at {url}" in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, no number reported


def test_cli_bad_qa_file_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "q", "answers": ["a"], "context": "c"}\n[1, 2\n')
    r = subprocess.run([sys.executable, "-m", "edgecloud.cli", "kvcache", "bench", "--qa", str(p)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "bad.jsonl:2: not valid JSON" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _tiny_text_engine(context: int = 512):
    """The tiny random Llama with a word tokenizer: enough to run the whole benchmark loop in seconds."""
    from tests.test_kvcache_mpic import tiny_engine

    class WordTok:
        eos_token_id = 1

        def __init__(self):
            self.vocab: dict[str, int] = {}

        def __call__(self, s, add_special_tokens=True):
            return {"input_ids": [self.vocab.setdefault(w, 2 + len(self.vocab) % 99) for w in s.split()]}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(f"w{i}" for i in ids)

    e = tiny_engine(context=context)
    e.tok = e.lm.tokenizer = WordTok()
    return e


def _tiny_items():
    return [QAItem(f"question {i} ?", ["w5"], f"gold passage {i} " + "x y z " * 4,
                   [f"other passage {j} " + "u v " * 5 for j in range(5)], "g", "squad") for i in range(3)]


def test_bench_loop_end_to_end_on_a_tiny_model():
    from edgecloud.kvcache.bench import run

    cfg = BenchConfig(min_chunks=3, max_chunks=4, groups=0, passkey=0, answer_tokens=3, bf16_floor=1, ks=(4,), k=4)
    out = run(_tiny_text_engine(), cfg, items=_tiny_items())
    m = out["methods"]
    assert out["requests"] == 3 and set(m) == {"full", "full-bf16", "prefix", "full-reuse", "cacheblend-15", "mpic-4"}
    for name in ("full", "prefix"):  # exact caches: fidelity to full prefill is exact
        assert m[name]["first_token_agreement"] == 1.0 and m[name]["top1_agreement"] == 1.0
        assert m[name]["kl"] < 1e-6
    assert out["floor_bf16"]["requests"] == 1 and out["floor_bf16"]["kl"] >= 0
    assert 0 <= out["accuracy_full"] <= 1 and out["accuracy_full_ci"][0] <= out["accuracy_full"]
    assert 0 < m["mpic-4"]["recompute_frac"] < 1 and m["full"]["recompute_frac"] == 1


def test_peer_ttft_warms_the_same_chunks_and_interleaves():
    from edgecloud.kvcache.bench import make_workload, peer_ttft

    class Peer:
        url, root = "http://fake", "/models/m"

        def __init__(self):
            self.sent, self.q = [], 0.0

        def ttft(self, ids):
            self.sent.append(list(ids))
            self.q += len(ids)
            return 0.5

        def prefix_cache_counters(self):
            return {"prefix_cache_queries": self.q, "prefix_cache_hits": self.q / 2}

    e, items = _tiny_text_engine(), _tiny_items()
    cfg = BenchConfig(min_chunks=3, max_chunks=4, groups=0, passkey=0, answer_tokens=3, k=4)
    p = Peer()
    out = peer_ttft(e, cfg, p, items)
    reqs = make_workload(e, cfg, items)
    chunks = {tuple(s.ids) for r in reqs for s in r.segments[1:] if s.kind == "chunk"}
    head = reqs[0].segments[0].ids
    assert out["warm_chunks"] == len(chunks) and len(p.sent) == len(chunks) + len(reqs)
    assert all(s[: len(head)] == head for s in p.sent[: len(chunks)])  # each chunk behind the system prompt
    assert p.sent[len(chunks):] == [[t for s in r.segments for t in s.ids] for r in reqs]  # the same token ids
    assert out["ttft_vllm_s"] == 0.5 and out["ttft_ratio_vs_vllm"] == out["ttft_mpic_beside_vllm_s"] / 0.5
    assert 0 < out["vllm_prefix_hit_rate"] < 1


def test_wilson_interval_matches_the_closed_form():
    from edgecloud.kvcache.fidelity import top2_gap, wilson

    lo, hi = wilson(28, 30)  # textbook value for 28/30 at 95%: [0.787, 0.982]
    assert abs(lo - 0.787) < 1e-3 and abs(hi - 0.982) < 1e-3
    lo, hi = wilson(30, 30)  # all agree: the interval still has width (a bootstrap of 30 ones would be [1, 1])
    assert abs(lo - 0.886) < 1e-3 and hi == 1.0
    assert top2_gap(torch.tensor([0.0, 3.0, 2.5, -1.0])) == 0.5


def test_fidelity_resume_pools_an_earlier_dump_and_rejects_another_workload(tmp_path):
    """A study resumed from its own dump of the first requests runs only the rest and reports what one whole run
    reports; a dump of another workload (another seed) is one clear error."""
    from edgecloud.kvcache.fidelity import FidelityConfig, fidelity

    e = _tiny_text_engine(context=2048)
    cfg = FidelityConfig(groups=0, passkey=4, ks=(4,), k=4, bf16_max=0)
    whole = fidelity(e, cfg, dump=str(tmp_path / "all.json"))
    rows = json.loads((tmp_path / "all.json").read_text())
    (tmp_path / "head.json").write_text(json.dumps({**rows, "rows": rows["rows"][:2]}))
    ran = []
    pooled = fidelity(e, cfg, progress=lambda i, n: ran.append(i), resume=str(tmp_path / "head.json"))
    assert ran == [3, 4] and pooled["requests"] == whole["requests"] == 4
    for key in ("first_token_agreement", "prompt_tokens_mean"):
        assert pooled[key] == whole[key]
    assert abs(pooled["methods"]["mpic-4"]["kl_first"] - whole["methods"]["mpic-4"]["kl_first"]) < 1e-6
    with pytest.raises(UserError, match="--resume"):
        fidelity(e, FidelityConfig(groups=0, passkey=4, ks=(4,), k=4, bf16_max=0, seed=1),
                 resume=str(tmp_path / "head.json"))


def test_fold_study_makes_the_larger_study_the_headline_and_rejects_another_model(tmp_path):
    """The contract key comes from the no-decoding study (its n and Wilson CI beside it); the run's own value is
    kept; a study of another model or k, or a file that is not a study, is one clear error (exit 2 in the CLI)."""
    from edgecloud.kvcache.fidelity import fold_into_run

    run = {"model": "m", "k": 32, "requests": 30, "first_token_agreement": 28 / 30}
    study = {"model": "m", "k": 32, "requests": 206, "first_token_agreement": 187 / 206,
             "first_token_agreement_ci": [0.86, 0.94], "provenance": {"commit": "abc"}}
    out = fold_into_run(run, study, "s.json")
    assert out["first_token_agreement"] == 187 / 206 and out["first_token_agreement_run"] == 28 / 30
    assert out["first_token_agreement_ci"] == [0.86, 0.94] and out["first_token_agreement_requests"] == 206
    assert out["first_token_agreement_source"]["provenance"] == {"commit": "abc"} and run["requests"] == 30
    assert fold_into_run(out, study)["first_token_agreement_run"] == 28 / 30  # folding twice keeps the run's own
    with pytest.raises(UserError, match="same model and k"):
        fold_into_run(run, {**study, "k": 64}, "s.json")
    with pytest.raises(UserError, match="not a fidelity study"):
        fold_into_run(run, {"rows": []}, "s.json")


def test_bench_fidelity_json_needs_a_saved_run_and_a_study(tmp_path):
    """bench/mpic.py: --fidelity-json alone, or pointing at a file that is not a study: one line, exit 2."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = {"config": {}, "model": "m", "threads": 1, "k": 32, "requests": 30, "first_token_agreement": 0.9,
           "provenance": {"command": "x"}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    (tmp_path / "bad.json").write_text("{}")
    for args in (["--fidelity-json", str(tmp_path / "bad.json")],
                 ["--from-json", str(tmp_path / "run.json"), "--fidelity-json", str(tmp_path / "bad.json")]):
        p = subprocess.run([sys.executable, str(root / "bench" / "mpic.py"), *args, "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, cwd=root, env={"PYTHONPATH": str(root), "PATH": ""})
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--fidelity-json" in p.stderr, p.stderr
