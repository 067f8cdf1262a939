"""Streaming scoring from the shards' feature columns equals scoring the whole sets in memory."""

import numpy as np
import pytest
import torch

from factory import metrics
from factory.config import from_dict
from factory.shards import ShardSink
from factory.stages.references import ReferenceBank, build_reference_bank, real_info
from factory.stages.score import score_sets

LABELS = [1, 4, 6]


@pytest.fixture(scope="module")
def scored(local_ray, tmp_path_factory):
    """A bank for three digits classes and a 'recipe' whose shards carry features: jittered train features."""
    out = str(tmp_path_factory.mktemp("scored"))
    cfg = from_dict({"data": {"source": "digits"}, "executor": {"num_actors": [1, 1]}, "eval": {"k": 3}})
    info = real_info(cfg)
    build_reference_bank(cfg, out, info, LABELS, progress=False)
    bank = ReferenceBank(out)
    sink = ShardSink(out, ["parquet"], class_names=info.class_names)
    g = torch.Generator().manual_seed(0)
    fake = {}
    for c in LABELS:
        f = bank.features("train", c)[:40]
        f = (f + 0.3 * torch.randn(f.shape, generator=g)).numpy().astype(np.float32)
        fake[c] = f
        for s, part in enumerate((f[:25], f[25:])):  # two shards per class
            records = [{"key": f"x_c{c:05d}_{s}_{i}", "image": b"\x89PNG", "label": c, "class_name": str(c),
                        "seed": 0, "features": v} for i, v in enumerate(part)]
            sink.commit("x", f"c{c:05d}-s{s:05d}", records, {})
    sets = {"real": sum(info.counts["train"][c] for c in LABELS), "x": 40 * len(LABELS)}
    return cfg, out, info, bank, fake, score_sets(cfg, out, sets, LABELS, info.class_names, chunk=2, progress=False)


def test_streamed_metrics_equal_the_in_memory_ones(scored):
    cfg, out, info, bank, fake, got = scored
    test = torch.cat([bank.features("test", c) for c in LABELS])
    test_labels = torch.cat([torch.full((info.counts["test"][c],), c) for c in LABELS])
    train = torch.cat([bank.features("train", c) for c in LABELS])
    train_labels = torch.cat([torch.full((info.counts["train"][c],), c) for c in LABELS])
    gauss = metrics.ClassGaussian(train, train_labels)
    for name, feats, labels in (("x", torch.from_numpy(np.concatenate([fake[c] for c in LABELS])),
                                 torch.cat([torch.full((40,), c) for c in LABELS])),
                                ("real", train, train_labels)):
        want = metrics.summary(test, test_labels, feats, labels, gauss, k=3)
        for key in ("precision", "recall", "density", "coverage", "f1_pc", "label_agreement", "real_hardness_mean",
                    "real_hardness_std"):
            assert got[name][key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (name, key)
        assert got[name]["fd"] == pytest.approx(want["fd"], rel=1e-6)
        assert got[name]["hardness_mean"] == pytest.approx(want["hardness_mean"], rel=1e-9)
    assert got["x"]["num_images"] == 120 and got["x"]["count_per_class"] == {"1": 40, "4": 40, "6": 40}


def test_per_class_view_is_prdc_on_each_class(scored):
    cfg, out, info, bank, fake, got = scored
    for c in LABELS:
        row = got["x"]["per_class"][str(c)]
        want = metrics.prdc(bank.features("test", c), torch.from_numpy(fake[c]), k=3)
        assert row["k"] == 3 and row["coverage"] == pytest.approx(want["coverage"], abs=1e-6)
        assert row["f1_pc"] == pytest.approx(metrics.f1(want["precision"], want["coverage"]), abs=1e-6)
    assert "subsample" in got["x"]["views"]["pooled"] and "all 120" in got["x"]["views"]["fd"]
    assert "3 nearest pooled test images" in got["x"]["views"]["label_agreement"]


def test_pooled_view_subsamples_large_sets_deterministically(scored, monkeypatch):
    from factory.stages import score

    cfg, out, info, bank, fake, _ = scored
    monkeypatch.setattr(score, "POOL", 60)
    a = score_sets(cfg, out, {"x": 120}, LABELS, info.class_names, progress=False)["x"]
    b = score_sets(cfg, out, {"x": 120}, LABELS, info.class_names, progress=False)["x"]
    assert a == b and a["num_images"] == 120  # FD and hardness still over every image
    assert "at most 60" in a["views"]["pooled"]
