"""The userspace link emulator against a kernel-shaped link (root only): two network namespaces joined by a veth
pair with tbf at a rate, vs the LinkProxy on loopback at the same rate. Two workloads, real processes on both paths:
the collab probe (bulk throughput, round trip of one DRAGON-sized draft, small ping) at several rates, and DRAGON
itself (`edgecloud rag cloud` in one namespace, `edgecloud rag device --json` in the other) at a low rate where the
196 KB drafts make the link matter. Writes docs/results/collab-link.{json,md,png}.

    PYTHONPATH=. .venv/bin/python bench/collab_link.py                 # rates 5 20 50 100 Mbit/s; DRAGON at 5
    PYTHONPATH=. .venv/bin/python bench/collab_link.py --rates 20 --no-dragon
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from edgecloud.collab import netns
from edgecloud.collab.probe import ProbeConfig
from edgecloud.errors import UserError
from edgecloud.results import Result, check_out_dir

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"
ARTICLES = "16"


def dragon_across(rate: float, mode: str, question: str, max_new: int) -> dict:
    def cloud(host):
        return ["edgecloud", "rag", "cloud", "--host", host, "--port", "0", "--articles", ARTICLES]

    def device(host, port):
        return ["edgecloud", "rag", "device", "--cloud", f"{host}:{port}", "--articles", ARTICLES, "--max-new",
                str(max_new), "--mode", mode, "--timeout", "120", "--json", question]

    out = {}
    for path, fn in (("kernel", netns.across_kernel), ("emulated", netns.across_emulator)):
        a = fn(rate, cloud, device, "listening on", 900)
        out[path] = {k: a[k] for k in ("per_token_s", "ttft_s", "total_s", "acceptance", "tokens", "fallback",
                                       "traffic")}
    k, e = out["kernel"], out["emulated"]
    return {"rate_mbit": rate, "mode": mode, **out, "same_tokens": k["tokens"] == e["tokens"],
            "ratio": {m: e[m] / k[m] for m in ("per_token_s", "ttft_s", "total_s") if k[m]}}


def _plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    rates = [r["rate_mbit"] for r in rows]
    for path, mark in (("kernel", "o-"), ("emulated", "s--")):
        a.plot(rates, [r[path]["bulk_mbps"] for r in rows], mark, label=f"{path} bulk goodput")
        b.plot(rates, [r[path]["message_rtt_s"] * 1000 for r in rows], mark, label=f"{path}: 196 KB draft + ack")
    a.plot(rates, rates, ":", color="#999", label="shaped rate")
    a.set_xlabel("rate (Mbit/s)")
    a.set_ylabel("measured Mbit/s")
    b.set_xlabel("rate (Mbit/s)")
    b.set_ylabel("round trip (ms)")
    b.set_yscale("log")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[5, 20, 50, 100])
    ap.add_argument("--dragon-rate", type=float, default=5)
    ap.add_argument("--no-dragon", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    check_out_dir(a.out)
    why = netns.unavailable()
    if why:
        raise UserError(f"kernel link cross-check: {why}; run as root on Linux with iproute2")
    t0, load0 = time.time(), list(os.getloadavg())
    rows = [netns.crosscheck(r, ProbeConfig(bulk_bytes=int(max(1e6, min(8e6, r * 2e5))))) for r in a.rates]
    data = {"probe": rows, "load_average": {"start": load0}}
    if not a.no_dragon:
        from edgecloud.rag.corpus import make_split

        q = f"What do you know about {make_split(n_articles=int(ARTICLES), seed=0).held_out[0][0]}?"
        data["dragon"] = [dragon_across(a.dragon_rate, m, q, 8) for m in ("dragon-device", "token-sync")]
    data["load_average"]["end"] = list(os.getloadavg())
    data["leftover_namespaces"] = netns.ours()
    res = Result("collab-link", data, seed=0, started=t0,
                 title="Link emulator vs kernel tbf on a veth pair between two network namespaces")
    res.table([{"rate_mbit": r["rate_mbit"], "kernel_mbps": r["kernel"]["bulk_mbps"],
                "emulated_mbps": r["emulated"]["bulk_mbps"], "ratio_bulk": r["ratio"]["bulk_mbps"],
                "kernel_draft_rtt_ms": r["kernel"]["message_rtt_s"] * 1000,
                "emulated_draft_rtt_ms": r["emulated"]["message_rtt_s"] * 1000,
                "ratio_draft_rtt": r["ratio"]["message_rtt_s"], "ping_diff_ms": r["ping_diff_ms"]} for r in rows])
    if "dragon" in data:
        res.table([{"mode": d["mode"], "rate_mbit": d["rate_mbit"], "path": p, "per_token_s": d[p]["per_token_s"],
                    "ttft_s": d[p]["ttft_s"], "bytes": d[p]["traffic"]["sent_bytes"] + d[p]["traffic"]["recv_bytes"],
                    "same_tokens": d["same_tokens"]} for d in data["dragon"] for p in ("kernel", "emulated")])
    res.figure = _plot(rows)
    for kind, path in res.write(a.out).items():
        print(kind, path)
    print(res.markdown)


if __name__ == "__main__":
    main()
