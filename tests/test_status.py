"""`factory status`: progress against the plan, throughput from the markers' times, ETA and failed shards, read
from a run's output alone, on a local disk and on the S3 test endpoint."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from factory.cli import main
from factory.dataplane import ShardFailed, pending_shards, run_shards
from factory.plan import Plan, RecipePlan
from factory.shards import ShardSink
from factory.status import plan_record, status

s3fs = pytest.importorskip("s3fs")

@pytest.fixture(scope="module")
def made(s3, tiny_run):
    """The session's tiny real run: 3 classes (1, 4, 7) x 3 images in shards of 2, 6 shards, 9 images."""
    return tiny_run[1]


def _status_json(capsys, output, *extra):
    assert main(["status", output, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_finished_run_local_and_on_s3(made, capsys):
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(made, "factory-test/status/out", recursive=True)
    for output in (made, "s3://factory-test/status/out"):
        st = _status_json(capsys, output)
        assert st["state"] == "complete" and st["config"] == "tiny"
        (cfg,) = st["recipes"]
        assert (cfg["shards_done"], cfg["shards_planned"], cfg["images_done"], cfg["images_planned"]) == (6, 6, 9, 9)
        assert cfg["eta_seconds"] == 0 and cfg["failed"] == [] and st["total"]["images_done"] == 9
        assert st["last_commit"] is not None and st["started"] <= st["last_commit"] + 1  # marker times were read
        assert main(["status", output]) == 0
        text = capsys.readouterr().out
        assert "6/6" in text and "9/9" in text and "done" in text


def test_throughput_and_eta_from_marker_times(made, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(made, out)
    # as seen mid-run: 2 shards (2 images each) not made yet, the others committed 10 s apart after the start
    rec = json.load(open(f"{out}/run.json"))
    t0 = 1_700_000_000.0
    rec.update(state="running", started=t0)
    rec.pop("finished")
    open(f"{out}/run.json", "w").write(json.dumps(rec))
    os.remove(f"{out}/cfg/_stats/c00001-s00000.json")
    os.remove(f"{out}/cfg/_stats/c00007-s00000.json")
    committed = {"c00001-s00001": 10, "c00004-s00000": 20, "c00004-s00001": 30, "c00007-s00001": 40}  # 1+2+1+1 images
    for name, dt in committed.items():
        os.utime(f"{out}/cfg/_stats/{name}.json", (t0 + dt, t0 + dt))

    st = status(out, window=300, now=t0 + 60)  # the window starts at the run's start
    tot = st["total"]
    assert (tot["shards_done"], tot["images_done"], tot["images_planned"]) == (4, 5, 9)
    assert st["window_seconds"] == 60 and tot["img_per_s"] == pytest.approx(5 / 60)
    assert tot["eta_seconds"] == pytest.approx(4 / (5 / 60))
    st = status(out, window=35, now=t0 + 60)  # the last 35 s: the two markers at +30 and +40, 2 images
    assert st["total"]["img_per_s"] == pytest.approx(2 / 35) and st["total"]["eta_seconds"] == pytest.approx(4 * 35 / 2)
    st = status(out, window=10, now=t0 + 60)  # nothing committed lately: no rate, no ETA
    assert st["total"]["img_per_s"] == 0 and st["total"]["eta_seconds"] is None


def _records(shard):
    return [{"key": shard.key(i), "image": f"{shard.seed}/{i}".encode(), "label": shard.label,
             "class_name": shard.class_name, "seed": shard.seed} for i in range(shard.num_images)]


class FailingProducer:
    """No model: class 1 raises, the others make small deterministic records."""

    def __call__(self, shard):
        if shard.label == 1:
            raise ValueError(f"no ink left for class {shard.class_name}")
        return _records(shard)


class WorkingProducer:
    def __call__(self, shard):
        return _records(shard)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_failed_shard_shows_its_error_until_it_commits(s3, local_ray, tmp_path, capsys, where):
    out = str(tmp_path / "out") if where == "local" else "s3://factory-test/status/failing"
    plan = Plan([RecipePlan("a", 2, 2)], [0, 1, 2], ["x", "y", "z"], seed=1)
    sink = ShardSink(out, ["parquet"])
    sink.put(f"{sink.root}/run.json", json.dumps({"state": "running", "plan": plan_record(plan, ["parquet"])}).encode())
    with pytest.raises(ShardFailed, match="no ink left for class y"):
        list(run_shards(plan, pending_shards(plan, sink), FailingProducer, out, sink.formats, (1, 1), progress=False))
    st = _status_json(capsys, out)
    assert [f["shard"] for f in st["total"]["failed"]] == ["a/c00001-s00000"]
    assert "ValueError: no ink left for class y" in st["total"]["failed"][0]["error"]
    assert main(["status", out]) == 0
    assert "  shard a/c00001-s00000: ValueError: no ink left for class y" in capsys.readouterr().out

    list(run_shards(plan, pending_shards(plan, sink), WorkingProducer, out, sink.formats, (1, 1), progress=False))
    st = _status_json(capsys, out)
    assert st["total"]["failed"] == [] and st["total"]["shards_done"] == 3
    sink.fs.invalidate_cache()
    assert not sink.fs.exists(f"{sink.root}/a/_errors/c00001-s00000.json")  # the commit removed the record


def test_status_and_verify_import_no_torch():
    code = "import sys, factory.cli, factory.status, factory.verify; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
