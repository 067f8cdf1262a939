"""Elastic pools: a worker node joins a real head mid-run, takes sampler actors, then is killed (preempted).

The run goes on with what is left and completes: every planned shard exactly once, and each shard's
bytes equal those the producer makes in-process without Ray.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from factory.plan import Plan, RecipePlan
from factory.shards import ShardSink


def _records(shard):
    return [{"key": shard.key(i), "image": f"{shard.seed}/{i}".encode() * 50, "label": shard.label,
             "class_name": shard.class_name, "seed": shard.seed} for i in range(shard.num_images)]


class GatedProducer:
    """No model: deterministic bytes per shard. Shards past the first few wait for the test's gate file,
    so the run cannot end before a node has joined, taken shards and been preempted, however loaded the
    machine is (a fixed sleep raced the node's start-up under load)."""

    def __init__(self, gate: str):
        self.gate = gate

    def __call__(self, shard):
        time.sleep(0.2)
        while shard.shard_id >= 4 and not os.path.exists(self.gate):
            time.sleep(0.1)
        return _records(shard)


def _plan():
    return Plan([RecipePlan("e", 30, 2)], list(range(4)), list("wxyz"), seed=5)  # 60 shards


DRIVER = """
import functools
from factory.dataplane import ensure_ray, pending_shards, run_shards
from factory.shards import ShardSink
from test_elastic import GatedProducer, _plan
ensure_ray()
plan = _plan()
sink = ShardSink({out!r}, ["parquet"])
make = functools.partial(GatedProducer, {gate!r})
for row in run_shards(plan, pending_shards(plan, sink), make, {out!r}, ["parquet"], (1, 3), progress=False):
    print("committed", row["shard"], flush=True)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_ports():
    """Ports of a node's own daemons, so that it never collides with another Ray on this machine."""
    return [f"--{flag}={_free_port()}" for flag in (
        "node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port")]


def _in_session(sid: int, *words: str) -> list[int]:
    """Processes of the session ``sid`` (a node started with start_new_session) whose command holds ``words``."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if all(w in cmd for w in words) and os.getsid(p.pid) == sid:
                found.append(p.pid)
        except (psutil.Error, ProcessLookupError):
            pass
    return found


@pytest.mark.integration
def test_worker_node_joins_and_is_preempted_mid_run(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests, env.get("PYTHONPATH")) if p)
    # a `ray start --head` cluster takes token auth; every node and the driver carry the token
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "5e1a57c0ffee00d15ea5edba5eba11a7"})
    ray_bin = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    gcs = _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="re", dir="/tmp")  # short: Ray's unix sockets live under it
    common = ["--block", "--node-ip-address=127.0.0.1"]
    head = subprocess.Popen([ray_bin, "start", "--head", *common, f"--port={gcs}", "--num-cpus=1",
                             "--include-dashboard=false", f"--temp-dir={ray_tmp}",
                             f"--ray-client-server-port={_free_port()}", *_own_ports()],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    procs = [head]
    try:
        address = f"127.0.0.1:{gcs}"
        end = time.time() + 120
        # the raylet too, not only the GCS that `ray status` answers from: a driver that finds another cluster's
        # raylet on this machine and not yet this one's waits out Ray's 60 s node lookup and fails to connect
        while subprocess.run([ray_bin, "status", f"--address={address}"], env=env,
                             capture_output=True).returncode != 0 or not _in_session(head.pid, "raylet/raylet"):
            assert time.time() < end and head.poll() is None, "the head node did not come up"
            time.sleep(1)

        out, gate = str(tmp_path / "out"), str(tmp_path / "gate")
        driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(out=out, gate=gate)],
                                  env={**env, "RAY_ADDRESS": address},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(driver)
        for line in driver.stdout:  # the head's one actor is working
            if line.startswith("committed"):
                break
        worker = subprocess.Popen([ray_bin, "start", f"--address={address}", *common, "--num-cpus=2", *_own_ports()],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        procs.append(worker)
        end = time.time() + 120
        while not _in_session(worker.pid, "MapWorker", "ShardWorker"):  # the pool scaled out onto the new node
            assert driver.poll() is None, "the run ended before the pool scaled onto the joined node: " + \
                driver.stderr.read()[-3000:]
            assert time.time() < end, "the actor pool never scaled onto the joined node"
            time.sleep(0.5)
        time.sleep(3)  # let the new actors take shards in flight (they wait at the gate)
        os.killpg(worker.pid, signal.SIGKILL)  # preemption: the node and its actors vanish at once
        worker.wait()
        open(gate, "w").close()  # the rest of the run, on the head alone
        stdout, stderr = driver.communicate(timeout=300)
        assert driver.returncode == 0, stderr[-3000:]
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    plan = _plan()
    sink = ShardSink(out, ["parquet"])
    assert sink.completed("e") == {plan.shard(i).name for i in range(len(plan))}
    expected = ShardSink(str(tmp_path / "expected"), ["parquet"])
    for i in range(len(plan)):
        s = plan.shard(i)
        expected.commit(s.recipe, s.name, _records(s), {})
    got = {os.path.basename(p): open(p, "rb").read() for p in sink.shard_files("e", "parquet")}
    want = {os.path.basename(p): open(p, "rb").read() for p in expected.shard_files("e", "parquet")}
    assert got == want
    leftovers = [f for _, _, fs in os.walk(out) for f in fs if not f.endswith((".parquet", ".json"))]
    assert all(".tmp-" in f for f in leftovers), leftovers
