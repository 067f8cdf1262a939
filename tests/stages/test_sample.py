"""The sample stage on a real local Ray: it needs the references stage's bank, records its stats last, resumes."""

import json
import os

import pytest

from factory.config import from_dict
from factory.plan import build_plan
from factory.shards import ShardSink
from factory.stages import marker
from factory.stages.references import real_info
from factory.stages.sample import require_shards, run_sample

TINY = {"name": "tiny", "seed": 1, "data": {"source": "digits", "classes": ["5"]},
        "sampling": {"steps": 2, "shard_size": 3}, "executor": {"num_actors": [1, 1]},
        "recipes": {"cfg": {"cfg_scale": 2.0, "images_per_class": 6}}}


def _shards(root):
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(root) for f in fs if f.endswith((".parquet", ".tar"))}


def test_sample_needs_the_bank_records_its_stats_and_resumes(local_ray, tmp_path):
    from factory.run import references_stage

    cfg = from_dict(TINY)
    info = real_info(cfg)
    plan = build_plan(cfg, info)
    out = str(tmp_path / "out")
    sink = ShardSink(out, cfg.output.formats)
    with pytest.raises(marker.StageMissing, match="sample needs the references stage's reference bank: "
                                                  "run --stages references first"):
        run_sample(cfg, out, plan, sink)
    assert not os.path.exists(out)
    with pytest.raises(marker.StageMissing, match="score needs the sample stage's shards"):
        require_shards(plan, sink, "score")

    references_stage(cfg, out, plan, info, sink, progress=False)
    first = run_sample(cfg, out, plan, sink)
    assert first["shards"] == {"planned": 2, "made": 2, "already_complete": 0} and first["images"] == 6
    assert json.load(open(f"{out}/_stages/sample.json")) == first
    made = _shards(out)
    assert len(made) == 4  # 2 shards x (parquet, webdataset)
    assert require_shards(plan, sink, "score") == first

    os.remove(f"{out}/cfg/_stats/c00005-s00001.json")  # a shard whose commit never happened: re-made, alone
    again = run_sample(cfg, out, plan, sink)
    assert again["shards"] == {"planned": 2, "made": 1, "already_complete": 1}
    assert _shards(out) == made  # same config and seed: the same bytes
