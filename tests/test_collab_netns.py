"""The userspace link emulator against a kernel-shaped link: two network namespaces joined by a veth pair with tbf
at the same rate, the real probe processes across both. Needs root and ``ip netns`` (skips otherwise, with the
reason); every namespace it creates is gone afterwards, also when the block fails."""

from __future__ import annotations

import os
import subprocess

import pytest

from edgecloud.collab import netns
from edgecloud.collab.probe import ProbeConfig

REASON = netns.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"kernel link cross-check skipped: {REASON}")


def test_namespaces_removed_even_on_failure():
    before = set(netns.ours())
    with pytest.raises(RuntimeError, match="boom"):
        with netns.veth_pair(10) as link:
            assert {link.a, link.b} <= set(netns.ours())
            qd = subprocess.run(["tc", "-n", link.a, "qdisc", "show"], capture_output=True, text=True).stdout
            assert "tbf" in qd and "10Mbit" in qd
            raise RuntimeError("boom")
    assert set(netns.ours()) == before


def test_stale_namespace_of_a_dead_process_is_cleaned():
    name = f"{netns.PREFIX}999999999x0a"  # no such pid
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in netns.cleanup_stale()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert name not in netns.ours()


@pytest.mark.slow
def test_emulator_matches_tbf_shaped_veth():
    """At 5 Mbit/s: bulk goodput and the round trip of a DRAGON-sized draft (~320 ms) agree within 20% (TCP/IP
    framing costs the kernel path ~4% of goodput; the emulator caps payload bytes). A low rate keeps the proxy's
    scheduling delay on a busy 2-core machine (tens of ms) small against what is measured."""
    c = netns.crosscheck(5, ProbeConfig(pings=3, messages=3, bulk_bytes=600_000))
    assert c["kernel"]["bulk_mbps"] == pytest.approx(5, rel=0.15)
    assert c["emulated"]["bulk_mbps"] == pytest.approx(5, rel=0.15)
    assert 0.8 < c["ratio"]["bulk_mbps"] < 1.2
    assert 0.8 < c["ratio"]["message_rtt_s"] < 1.2
    assert abs(c["ping_diff_ms"]) < 50
    assert not [n for n in netns.ours() if n.startswith(f"{netns.PREFIX}{os.getpid()}x")]  # none of ours left
