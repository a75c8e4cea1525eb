"""A kernel-shaped link to cross-check the userspace emulator: two network namespaces joined by a veth pair, each
end shaped by the kernel's ``tbf`` qdisc at the same rate (this kernel has no ``netem``, so there is no kernel delay
or jitter to compare; bandwidth is what the kernel can shape).

:func:`veth_pair` creates namespaces ``ecl<pid><n>a`` / ``...b`` (addresses 10.213.x.1 / .2, /30, which exist only
inside them), yields a :class:`LinkPair` that prefixes commands with ``ip netns exec``, and deletes both namespaces
(and with them the veth pair) when the block ends, also on an exception; :func:`cleanup_stale` removes namespaces
left by a process of ours that was killed. :func:`crosscheck` runs the same collab probe processes
(:mod:`edgecloud.collab.probe`) across the veth pair and across the userspace :class:`~edgecloud.collab.link.LinkProxy`
on loopback at the same rate, and returns both sets of figures. Needs root and ``ip``/``tc``; :func:`unavailable`
says why not.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from edgecloud.collab.probe import ProbeConfig

PREFIX = "ecl"
_NAME = re.compile(rf"^{PREFIX}(\d+)x(\d+)[ab]$")
_count = itertools.count()


def _run(*argv: str, timeout: float = 15.0) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def unavailable() -> str | None:
    """None when namespaces and tbf can be used here, else the reason (for a test's skip message)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root: creating network namespaces, veth pairs and tbf qdiscs requires CAP_NET_ADMIN"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the '{tool}' command (iproute2) is not installed"
    name = f"{PREFIX}{os.getpid()}x{next(_count)}a"
    try:
        _run("ip", "netns", "add", name)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"ip netns is unavailable here: {e}"
    _run("ip", "netns", "del", name)
    return None


def ours() -> list[str]:
    out = _run("ip", "netns", "list")
    return [line.split()[0] for line in out.splitlines() if line.strip() and _NAME.match(line.split()[0])]


def cleanup_stale() -> list[str]:
    """Delete namespaces of ours whose creating process is gone; returns their names."""
    gone = []
    for name in ours():
        pid = int(_NAME.match(name).group(1))
        if not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=15)
            gone.append(name)
    return gone


@dataclass(frozen=True)
class LinkPair:
    a: str  # namespace of the client side (the device)
    b: str  # namespace of the server side (the cloud)
    ip_a: str
    ip_b: str
    rate_mbit: float

    def cmd(self, ns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]


def tbf_args(rate_mbit: float, queue_ms: int = 1000) -> list[str]:
    """tbf at ``rate_mbit``: burst of 10 ms at that rate (at least two full frames) so the shape is smooth, and a
    queue of ``queue_ms`` so TCP sees delay rather than drops."""
    burst = max(3028, int(rate_mbit * 1e6 / 8 / 100))
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", f"{queue_ms}ms"]


@contextmanager
def veth_pair(rate_mbit: float) -> Iterator[LinkPair]:
    """Two fresh namespaces joined by a veth pair, both ends shaped to ``rate_mbit``; always removed after."""
    if rate_mbit <= 0:
        raise ValueError(f"rate_mbit={rate_mbit}: must be > 0")
    cleanup_stale()
    n = next(_count)
    tag = f"{PREFIX}{os.getpid()}x{n}"
    a, b = tag + "a", tag + "b"
    va, vb = f"ecv{os.getpid() % 100000}{n}a"[:15], f"ecv{os.getpid() % 100000}{n}b"[:15]
    net = f"10.213.{(os.getpid() * 7 + n) % 250}"
    pair = LinkPair(a, b, f"{net}.1", f"{net}.2", rate_mbit)
    made: list[str] = []
    try:
        for ns in (a, b):
            _run("ip", "netns", "add", ns)
            made.append(ns)
        _run("ip", "link", "add", va, "type", "veth", "peer", "name", vb)
        made.append("link")
        for ns, dev, ip in ((a, va, pair.ip_a), (b, vb, pair.ip_b)):
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *tbf_args(rate_mbit))
        yield pair
    finally:
        if "link" in made:  # still in the root namespace if moving it failed
            subprocess.run(["ip", "link", "del", va], capture_output=True, timeout=15)
        for ns in (a, b):
            if ns in made:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=15)


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def start_server(argv: list[str], marker: str) -> tuple[subprocess.Popen, int]:
    """Start a server process and read its port from the first stdout line that holds ``marker``."""
    env = dict(os.environ, EDGECLOUD_THREADS="1")
    err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks on stderr
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    p.errfile = err
    line = p.stdout.readline()
    if marker not in line:
        p.kill()
        p.wait(timeout=15)
        err.seek(0)
        why = err.read().strip()[-400:]
        stop(p)
        raise RuntimeError(f"{' '.join(argv)} did not start: {line.strip()!r} {why}")
    return p, int(re.search(r":(\d+)", line.split(marker, 1)[1]).group(1))


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=15)
        p.stdout.close()
        p.errfile.close()


def run_client(argv: list[str], timeout: float) -> dict:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr.strip()[-400:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _probe_args(cfg: ProbeConfig) -> list[str]:
    return [a for f, v in asdict(cfg).items() for a in ("--" + f.replace("_", "-"), str(v))]


Args = Callable[..., list[str]]


def across_kernel(rate_mbit: float, server: Args, client: Args, marker: str, timeout: float) -> dict:
    """``python -m server(host)`` in one namespace, ``python -m client(host, port)`` in the other, across the
    tbf-shaped veth pair; returns the client's last stdout line as JSON."""
    with veth_pair(rate_mbit) as link:
        srv, port = start_server(link.cmd(link.b, _python(*server(link.ip_b))), marker)
        try:
            return run_client(link.cmd(link.a, _python(*client(link.ip_b, port))), timeout)
        finally:
            stop(srv)


def across_emulator(rate_mbit: float, server: Args, client: Args, marker: str, timeout: float, rtt_ms: float = 0.0,
                    seed: int = 0) -> dict:
    """The same two processes on loopback with the userspace link proxy (same rate) between them."""
    srv, port = start_server(_python(*server("127.0.0.1")), marker)
    try:
        proxy, pport = start_server(_python("edgecloud.collab.link", "--listen", "0", "--to", f"127.0.0.1:{port}",
                                            "--bandwidth-mbps", str(rate_mbit), "--rtt-ms", str(rtt_ms), "--seed",
                                            str(seed)), "link proxy")
        try:
            return run_client(_python(*client("127.0.0.1", pport)), timeout)
        finally:
            stop(proxy)
    finally:
        stop(srv)


def crosscheck(rate_mbit: float, cfg: ProbeConfig | None = None) -> dict:
    """Kernel-shaped vs emulated probe figures at one rate, with emulated/kernel ratios."""
    cfg = cfg or ProbeConfig()
    marker, timeout = "listening on", cfg.timeout_s * 4

    def server(host):
        return ["edgecloud.collab.probe", "server", "--host", host]

    def client(host, port):
        return ["edgecloud.collab.probe", "client", "--to", f"{host}:{port}", *_probe_args(cfg)]

    kernel = across_kernel(rate_mbit, server, client, marker, timeout)
    emulated = across_emulator(rate_mbit, server, client, marker, timeout)
    return {"rate_mbit": rate_mbit, "kernel": kernel, "emulated": emulated,
            "ratio": {k: emulated[k] / kernel[k] for k in ("bulk_mbps", "message_rtt_s")},
            # both sub-millisecond here (no kernel delay to shape): compared as a difference, not a ratio
            "ping_diff_ms": (emulated["ping_rtt_s"] - kernel["ping_rtt_s"]) * 1000}
