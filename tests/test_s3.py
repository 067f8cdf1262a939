"""Object storage: shards land on a real S3-compatible endpoint (moto's server on 127.0.0.1) via s3fs.

The endpoint and credentials reach every process the standard way, through the environment
(``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ...), never through the job's config.
"""

import threading
import time

import pyarrow.parquet as pq
import pytest

from factory.dataplane import pending_shards, run_shards
from factory.plan import Plan, RecipePlan
from factory.shards import ShardSink

s3fs = pytest.importorskip("s3fs")


class SlowProducer:
    def __call__(self, shard):
        time.sleep(0.2)
        return [{"key": shard.key(i), "image": f"{shard.seed}/{i}".encode(), "label": shard.label,
                 "class_name": shard.class_name, "seed": shard.seed} for i in range(shard.num_images)]


def _plan():
    return Plan([RecipePlan("a", 12, 3)], list(range(3)), ["x", "y", "z"], seed=5)


def test_shards_land_on_s3_and_rerun_skips(s3, local_ray):
    out = "s3://factory-test/run1"
    plan, sink = _plan(), ShardSink(out, ["parquet", "webdataset"])
    list(run_shards(plan, pending_shards(plan, sink), SlowProducer, out, sink.formats, (1, 2)))
    assert pending_shards(plan, sink) == []
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    files = sorted(fs.glob("factory-test/run1/a/parquet/*.parquet"))
    assert len(files) == len(plan)
    table = pq.read_table(files[0], filesystem=fs)
    assert table.num_rows == 3 and table.column("label").to_pylist() == [0, 0, 0]
    etags = {f: fs.info(f)["ETag"] for f in files}
    list(run_shards(plan, list(range(len(plan))), SlowProducer, out, sink.formats, (1, 1)))
    fs.invalidate_cache()
    assert {f: fs.info(f)["ETag"] for f in files} == etags


def test_endpoint_restart_mid_run_is_retried(s3, local_ray):
    server, port = s3
    out = "s3://factory-test/run2"
    plan, sink = _plan(), ShardSink(out, ["parquet"])

    def bounce():
        time.sleep(1.5)
        server.stop()  # moto keeps its state in this process, so the restarted endpoint has the bucket
        time.sleep(2.0)
        server._server = None
        server.start()

    t = threading.Thread(target=bounce)
    t.start()
    rows = list(run_shards(plan, pending_shards(plan, sink), SlowProducer, out, sink.formats, (1, 2)))
    t.join()
    assert sorted(r["shard_id"] for r in rows) == list(range(len(plan)))
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.invalidate_cache()
    files = sorted(fs.glob("factory-test/run2/**"))
    assert all(f.endswith((".parquet", ".json")) for f in files if fs.isfile(f))
    for f in fs.glob("factory-test/run2/a/parquet/*.parquet"):
        assert pq.read_table(f, filesystem=fs).num_rows == 3
