"""`ray job submit` to a real head node on loopback; output to an S3-compatible endpoint (moto).

The endpoint and the credentials reach the job through the cluster's environment, never through the
job's YAML, and a planted secret must not appear in any output object or in the job's logs.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

SECRET = "planted-Secret-7f3a9c2e41d8b6"
RAY_TOKEN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"  # the head's auth token, for this loopback cluster only


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(1)
    raise TimeoutError(what)


@pytest.fixture
def cluster(tmp_path):
    s3_port, gcs_port, dash_port = _free_port(), _free_port(), _free_port()
    # Every port of the head's own: the default agent / metrics ports may be held by another local Ray
    # (the test session's own), and a head whose agent cannot bind answers "No available agent".
    agent_ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port")]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port)
    server.start()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "factory-test",
                "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1", "TQDM_DISABLE": "1",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN})
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix sockets live under it
    ray_bin = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash_port}", f"--temp-dir={ray_tmp}", *agent_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        def up():
            return subprocess.run([ray_bin, "job", "list", "--address", address], env=env,
                                  capture_output=True).returncode == 0

        old = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        os.environ.update({k: env[k] for k in old})
        _wait(up, 120, "the head node's job server did not come up")
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("factory-jobs")
        yield address, env, ray_bin
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        server.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        for k, v in locals().get("old", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.integration
def test_ray_job_submit_lands_the_run_on_s3(cluster, tmp_path):
    address, env, ray_bin = cluster
    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "tiny.yaml").write_text(yaml.safe_dump({
        "name": "submitted", "data": {"source": "digits", "classes": ["0", "1"]},
        "sampling": {"steps": 3, "shard_size": 6},
        "executor": {"num_actors": [1, 1]},
        "recipes": {"cfg": {"images_per_class": 12}},
    }))
    for attempt in range(20):  # the head's job agent may come up a little after its job server
        job_id = f"factory-digits-{attempt}"
        submit = subprocess.run(
            [ray_bin, "job", "submit", "--address", address, "--submission-id", job_id,
             "--working-dir", str(workdir), "--", "factory", "run", "tiny.yaml", "--output",
             "s3://factory-jobs/run", "--quiet"], env=env, capture_output=True, text=True, timeout=600)
        logs = submit.stdout + submit.stderr
        if "No available agent" not in logs:
            break
        time.sleep(3)
    status = subprocess.run([ray_bin, "job", "status", "--address", address, job_id], env=env,
                            capture_output=True, text=True)
    status = status.stdout + status.stderr
    assert submit.returncode == 0 and "succeeded" in status.lower(), logs[-3000:]
    assert "output: s3://factory-jobs/run" in logs  # the closing summary names the output
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.invalidate_cache()
    assert len(fs.glob("factory-jobs/run/cfg/parquet/*.parquet")) == 4
    assert len(fs.glob("factory-jobs/run/cfg/_stats/*.json")) == 4
    objects = [f for f in fs.find("factory-jobs/run")]
    assert "factory-jobs/run/report.html" in objects and "factory-jobs/run/metrics.json" in objects
    for f in objects:
        assert SECRET.encode() not in fs.cat_file(f), f"the planted secret leaked into {f}"
    assert SECRET not in logs
