import os

import pytest

from factory.dataplane import pending_shards, run_shards
from factory.plan import Plan, RecipePlan
from factory.shards import ShardSink


class TextProducer:
    """A producer with no model: the image bytes spell out the shard's identity."""

    def __call__(self, shard):
        return [{"key": shard.key(i), "image": f"{shard.seed}/{i}".encode(), "label": shard.label,
                 "class_name": shard.class_name, "seed": shard.seed} for i in range(shard.num_images)]


class BrokenProducer:
    def __call__(self, shard):
        return []


def _plan():
    return Plan([RecipePlan("a", 5, 2), RecipePlan("b", 2, 2)], [0, 1, 2], ["x", "y", "z"], seed=3)


def test_every_shard_once_then_rerun_skips(local_ray, tmp_path):
    plan, out = _plan(), str(tmp_path)
    sink = ShardSink(out, ["parquet", "webdataset"])
    rows = list(run_shards(plan, pending_shards(plan, sink), TextProducer, out, sink.formats, (1, 2)))
    assert sorted(r["shard_id"] for r in rows) == list(range(len(plan)))
    assert not any(r["skipped"] for r in rows)
    for recipe, per_class in (("a", 3), ("b", 1)):
        assert len(sink.completed(recipe)) == 3 * per_class
        assert len(sink.shard_files(recipe, "parquet")) == 3 * per_class
    before = {p: os.stat(p).st_mtime_ns for p in sink.shard_files("a", "webdataset")}
    assert pending_shards(plan, sink) == []
    # a retried task that meets a completed shard skips it without touching its files
    again = list(run_shards(plan, [0, 1], TextProducer, out, sink.formats, (1, 1)))
    assert all(r["skipped"] for r in again)
    assert before == {p: os.stat(p).st_mtime_ns for p in sink.shard_files("a", "webdataset")}


def test_partial_run_resumes_only_missing_shards(local_ray, tmp_path):
    plan, out = _plan(), str(tmp_path)
    sink = ShardSink(out, ["parquet"])
    list(run_shards(plan, [0, 2, 4], TextProducer, out, sink.formats, (1, 1)))
    pending = pending_shards(plan, sink)
    assert pending == [i for i in range(len(plan)) if i not in (0, 2, 4)]
    rows = list(run_shards(plan, pending, TextProducer, out, sink.formats, (1, 2)))
    assert sorted(r["shard_id"] for r in rows) == pending and pending_shards(plan, sink) == []


def test_producer_mismatch_fails_loudly_and_commits_nothing(local_ray, tmp_path):
    plan, out = _plan(), str(tmp_path)
    with pytest.raises(Exception, match="producer made 0 records"):
        list(run_shards(plan, [0], BrokenProducer, out, ["parquet"], (1, 1)))
    assert ShardSink(out, ["parquet"]).completed("a") == set()


class PixelProducer:
    """Returns uint8 pixels, as the GPU actors do: the CPU stage's ``finish`` encodes them."""

    def __call__(self, shard):
        import numpy as np

        rng = np.random.default_rng(shard.seed)
        return [{"key": shard.key(i), "image": rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "label": shard.label,
                 "class_name": shard.class_name, "seed": shard.seed} for i in range(shard.num_images)]


def test_the_cpu_stage_encodes_what_the_actors_make(local_ray, tmp_path):
    import functools
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from factory.shards import encode_images

    plan, out = _plan(), str(tmp_path)
    finish = functools.partial(encode_images, codec="png")
    rows = list(run_shards(plan, [0, 1], PixelProducer, out, ["parquet"], (1, 1), finish=finish, commit_stage=True))
    assert sorted(r["shard_id"] for r in rows) == [0, 1] and all(r["commit_seconds"] >= 0 for r in rows)
    shard = plan.shard(0)
    table = pq.read_table(ShardSink(out, ["parquet"]).path(shard.recipe, "parquet", shard.name))
    want = PixelProducer()(shard)
    got = [np.asarray(Image.open(io.BytesIO(img["bytes"]))) for img in table.column("image").to_pylist()]
    assert all(np.array_equal(g, w["image"]) for g, w in zip(got, want)) and len(got) == shard.num_images


@pytest.mark.parametrize("commit_stage", [True, False])
def test_an_encoder_error_names_the_shard_and_commits_nothing(local_ray, tmp_path, commit_stage):
    import functools

    from factory.shards import encode_images

    plan, out = _plan(), str(tmp_path)
    with pytest.raises(Exception, match=r"shard a/.*unknown image codec 'gif'"):
        list(run_shards(plan, [0], PixelProducer, out, ["parquet"], (1, 1),
                        finish=functools.partial(encode_images, codec="gif"), commit_stage=commit_stage))
    sink = ShardSink(out, ["parquet"])
    assert sink.completed("a") == set() and sink.shard_files("a", "parquet") == []
