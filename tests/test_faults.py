"""Exactly-once under faults: sampler actors SIGKILLed mid-run, a driver killed and rerun."""

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from factory.dataplane import pending_shards, run_shards
from factory.plan import Plan, RecipePlan
from factory.shards import ShardSink


class SlowProducer:
    """No model: deterministic bytes per shard, slow enough that kills land mid-run."""

    def __call__(self, shard):
        time.sleep(0.25)
        return [{"key": shard.key(i), "image": f"{shard.seed}/{i}".encode() * 50, "label": shard.label,
                 "class_name": shard.class_name, "seed": shard.seed} for i in range(shard.num_images)]


def _plan():
    return Plan([RecipePlan("a", 24, 2)], list(range(4)), list("wxyz"), seed=11)


def _shard_bytes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith((".parquet", ".tar")):
                out[os.path.relpath(os.path.join(d, f), root)] = open(os.path.join(d, f), "rb").read()
    return out


def _worker_pids():
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "MapWorker" in cmd and "ShardWorker" in cmd:
            pids.append(p.pid)
    return pids


def test_killed_actors_lose_and_duplicate_nothing(local_ray, tmp_path):
    plan = _plan()
    clean, faulty = str(tmp_path / "clean"), str(tmp_path / "faulty")
    list(run_shards(plan, list(range(len(plan))), SlowProducer, clean, ["parquet", "webdataset"], (1, 2)))

    killed, done = [], threading.Event()

    def killer():
        while len(killed) < 3 and not done.is_set():
            time.sleep(1.0)
            pids = _worker_pids()
            if pids:
                os.kill(pids[len(killed) % len(pids)], signal.SIGKILL)
                killed.append(pids[0])

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    sink = ShardSink(faulty, ["parquet", "webdataset"])
    # the GPU pools' layout (a separate commit stage) against the clean run's in-actor commits: same bytes
    rows = list(run_shards(plan, pending_shards(plan, sink), SlowProducer, faulty, sink.formats, (1, 2),
                           commit_stage=True))
    done.set()
    thread.join()
    assert len(killed) >= 2, "the run ended before the faults were injected"
    assert sorted({r["shard_id"] for r in rows}) == list(range(len(plan)))
    assert pending_shards(plan, sink) == []
    assert _shard_bytes(faulty) == _shard_bytes(clean)
    leftovers = [f for _, _, fs in os.walk(faulty) for f in fs if not f.endswith((".parquet", ".tar", ".json"))]
    assert leftovers == [] or all(".tmp-" in f for f in leftovers)


DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from factory.dataplane import ensure_ray, pending_shards, run_shards
from factory.shards import ShardSink
from test_faults import SlowProducer, _plan
ensure_ray(num_cpus=2)
plan = _plan()
sink = ShardSink({out!r}, ["parquet"])
for row in run_shards(plan, pending_shards(plan, sink), SlowProducer, {out!r}, ["parquet"], (1, 1), progress=False):
    print("committed", row["shard"], flush=True)
"""


@pytest.mark.integration
def test_killed_driver_resumes_without_rewriting(tmp_path):
    out = str(tmp_path / "out")
    script = DRIVER.format(tests=os.path.dirname(__file__), out=out)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the driver's Ray workers import SlowProducer from this module by name (sys.path does not reach them)
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("committed")
        if seen >= 3:
            break
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
    proc.wait()
    sink = ShardSink(out, ["parquet"])
    first = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in sink.shard_files("a", "parquet")
             if os.path.basename(p)[:-len(".parquet")] in sink.completed("a")}
    assert 3 <= len(first) < len(_plan())
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert pending_shards(_plan(), sink) == []
    for p, (mtime, data) in first.items():
        assert os.stat(p).st_mtime_ns == mtime and open(p, "rb").read() == data
    # the rerun made only what was missing (a stray worker of the killed run may still have finished one)
    assert done.stdout.count("committed") <= len(_plan()) - len(first)
