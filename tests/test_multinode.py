"""Two "nodes" x one process: DeepSpeed ZeRO-2 training with a real TCP rendezvous between two
network namespaces that this test creates (a veth pair), on this one machine."""

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from helpers import SMALL_RUN, child_env, final_weights, last_by_step


def _sh(*cmd):
    return subprocess.run(list(cmd), capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """(ns_a, ip_a, ns_b, ip_b, if_a, if_b), torn down afterwards; skips where namespaces are not allowed."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed; apt-get install iproute2")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    tag = uuid.uuid4().hex[:6]
    ns_a, ns_b, if_a, if_b = f"fsa{tag}", f"fsb{tag}", f"va{tag}", f"vb{tag}"
    probe = _sh("ip", "netns", "add", ns_a)
    if probe.returncode != 0:
        pytest.skip(f"network namespaces are not permitted here: {probe.stderr.strip()}")
    try:
        steps = [
            ("ip", "netns", "add", ns_b),
            ("ip", "link", "add", if_a, "type", "veth", "peer", "name", if_b),
            ("ip", "link", "set", if_a, "netns", ns_a),
            ("ip", "link", "set", if_b, "netns", ns_b),
            ("ip", "-n", ns_a, "addr", "add", "10.213.7.1/24", "dev", if_a),
            ("ip", "-n", ns_b, "addr", "add", "10.213.7.2/24", "dev", if_b),
            ("ip", "-n", ns_a, "link", "set", if_a, "up"),
            ("ip", "-n", ns_b, "link", "set", if_b, "up"),
            ("ip", "-n", ns_a, "link", "set", "lo", "up"),
            ("ip", "-n", ns_b, "link", "set", "lo", "up"),
        ]
        for cmd in steps:
            r = _sh(*cmd)
            if r.returncode != 0:
                pytest.skip(f"could not build the test network ({' '.join(cmd)}): {r.stderr.strip()}")
        yield ns_a, "10.213.7.1", ns_b, "10.213.7.2", if_a, if_b
    finally:
        _sh("ip", "netns", "del", ns_a)
        _sh("ip", "netns", "del", ns_b)


def test_two_nodes_zero2_over_tcp(tmp_path, two_hosts):
    ns_a, ip_a, ns_b, ip_b, if_a, if_b = two_hosts
    run_dir = tmp_path / "run"
    procs = []
    for rank, (ns, ifname) in enumerate(((ns_a, if_a), (ns_b, if_b))):
        env = child_env(tmp_path)
        # One process per node; the rendezvous crosses the veth link to node A's address.
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR=ip_a, MASTER_PORT="29731",
                   GLOO_SOCKET_IFNAME=ifname)
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "flowscale.cli", "train", *SMALL_RUN,
               f"train.run_dir={run_dir}", "train.steps=4", "engine.zero_stage=2"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
        assert p.returncode == 0, out[-3000:]
    assert "ranks=2" in outs[0]
    assert last_by_step(run_dir, "health/ranks_agree") == {4: 1}
    assert len(last_by_step(run_dir)) == 4
    assert final_weights(run_dir)
