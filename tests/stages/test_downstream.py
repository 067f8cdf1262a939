"""The downstream stage on a real local Ray: one classifier on the real digits and one on a recipe's shards,
each finished classifier's result a file under <output>/_downstream/ that a rerun reads back."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from factory.config import from_dict
from factory.data import load_real
from factory.plan import Plan, RecipePlan
from factory.shards import ShardSink
from factory.stages.downstream import run_downstream


class Info:
    """What the stage needs of a real set (a ``RealInfo``): names, size, mode, counts; no images."""

    def __init__(self, train, test):
        self.class_names, self.size, self.mode = list(train.class_names), train.size, train.mode
        self.counts = {s: np.bincount(r.labels, minlength=10).tolist() for s, r in (("train", train), ("test", test))}
        self.num_classes = len(self.class_names)


def _commit_real(sink, train, recipe: str, per_class: int | None = None):
    """Commit the real digits train images (the first ``per_class`` of each class) as ``recipe``'s shards."""
    for label in range(10):
        records = [{"key": f"c{label}-{i}", "image": _png(a), "label": label, "class_name": str(label), "seed": i}
                   for i, a in enumerate(train.of_class(label)[:per_class])]
        sink.commit(recipe, f"c{label:05d}-s00000", records, {})


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stage(local_ray, tmp_path_factory):
    """An output whose recipe "cfg" holds the real digits train split as shards, and the stage run on it."""
    train, test = load_real("digits", "train"), load_real("digits", "test")
    out = str(tmp_path_factory.mktemp("out"))
    _commit_real(ShardSink(out, ["parquet"], class_names=train.class_names), train, "cfg")
    cfg = from_dict({"data": {"source": "digits"}, "recipes": {"cfg": {"cfg_scale": 2.0}},
                     "downstream": {"enabled": True, "model": "convnet", "epochs": 1, "batch_size": 32, "lr": 0.02,
                                    "num_workers": 1, "train_on": ["synthetic", "real"]}})
    plan = Plan([RecipePlan("cfg", 135, 135)], list(range(10)), train.class_names, 0)
    info = Info(train, test)
    return cfg, out, plan, info, run_downstream(cfg, out, plan, info)


def test_every_classifier_is_judged_on_the_streamed_test_split(stage):
    _, out, _, _, result = stage
    got = result["accuracy"]
    assert result["accuracy_std"] == {"real": {"real": 0.0}, "cfg": {"synthetic": 0.0}}  # one seed
    assert set(got) == {"real", "cfg"} and set(got["real"]) == {"real"} and set(got["cfg"]) == {"synthetic"}
    assert got["real"]["real"] > 0.7 and got["cfg"]["synthetic"] > 0.7, got  # chance: 0.1
    for run in ("real-real", "cfg-synthetic"):
        with open(os.path.join(out, "_downstream", f"{run}.json")) as f:
            result = json.load(f)
        assert result["test_counts"]["images"] == np.bincount(load_real("digits", "test").labels).tolist()
        assert round(sum(result["test_counts"]["correct"]) / 450, 4) == got[run.split("-")[0]][run.split("-")[1]]


def test_a_finished_classifier_is_read_back_not_retrained(stage):
    cfg, out, plan, info, got = stage
    shutil.rmtree(os.path.join(out, "_train"))  # no checkpoint to resume from: only the results remain
    assert run_downstream(cfg, out, plan, info) == got
    assert not os.path.exists(os.path.join(out, "_train"))  # no Ray Train run was started


def test_a_recipe_without_parquet_shards_is_refused_before_training(stage, tmp_path):
    cfg, _, _, info, _ = stage
    plan = Plan([RecipePlan("cfg", 135, 135)], list(range(10)), info.class_names, 0)
    with pytest.raises(FileNotFoundError, match="recipe 'cfg' has no Parquet shards"):
        run_downstream(cfg, str(tmp_path), plan, info)
    assert os.listdir(tmp_path) == []


def test_the_distillation_protocol_trains_seeds_and_a_random_real_subset(local_ray, tmp_path):
    """IPC 10: a ConvNet per seed on the recipe's set and on a random real subset of the same size, with
    random-resized crops, flips and CutMix; means and stds over the seeds."""
    train, test = load_real("digits", "train"), load_real("digits", "test")
    out = str(tmp_path / "out")
    _commit_real(ShardSink(out, ["parquet"], class_names=train.class_names), train, "cfg", per_class=10)
    cfg = from_dict({"data": {"source": "digits"}, "recipes": {"cfg": {"images_per_class": 10}},
                     "downstream": {"enabled": True, "model": "convnet", "epochs": 40, "checkpoints": 4, "lr": 0.01,
                                    "num_workers": 2, "parallel": "runs", "seeds": 2, "random_real": True,
                                    "augment": "resized_crop", "flip": True, "cutmix": 0.5}})
    plan = Plan([RecipePlan("cfg", 10, 10)], list(range(10)), train.class_names, 0)
    got = run_downstream(cfg, out, plan, Info(train, test))
    assert sorted(os.listdir(os.path.join(out, "_downstream"))) == [
        "cfg-synthetic-s1.json", "cfg-synthetic.json", "random_real-real-s1.json", "random_real-real.json"]
    assert got["images"] == {"random_real": 100}
    for name, mode in (("cfg", "synthetic"), ("random_real", "real")):
        accs = got["accuracy_seeds"][name][mode]
        assert len(accs) == 2 and min(accs) > 0.5, got  # 100 images, chance 0.1
        assert got["accuracy"][name][mode] == round(float(np.mean(accs)), 4)
        assert got["accuracy_std"][name][mode] == round(float(np.std(accs)), 4)
    results = {f: json.load(open(os.path.join(out, "_downstream", f))) for f in os.listdir(os.path.join(out, "_downstream"))}
    assert {r["seed"] for r in results.values()} == {0, 1} and all(r["train_images"] == 100 for r in results.values())
    # a seed changes the classifier (initialisation, order, augmentation; for random_real the subset too)
    assert results["cfg-synthetic.json"]["history"] != results["cfg-synthetic-s1.json"]["history"]
    # checkpoints: 4 over 40 epochs: a report and checkpoint every 10 epochs, one history entry each
    assert all([h["epoch"] for h in r["history"]] == [10, 20, 30, 40] for r in results.values())


def test_a_recipe_named_like_a_real_row_is_refused():
    from factory.stages.downstream import classifier_runs

    cfg = from_dict({"recipes": {"random_real": {"images_per_class": 10}},
                     "downstream": {"enabled": True, "random_real": True, "seeds": 2}})
    plan = Plan([RecipePlan("random_real", 10, 10)], list(range(10)), [str(i) for i in range(10)], 0)
    with pytest.raises(ValueError, match="recipe 'random_real': the name of a downstream row"):
        classifier_runs(cfg, plan)
    cfg = from_dict({"recipes": {"cfg": {"images_per_class": 10}}, "downstream": {"enabled": True, "seeds": 2}})
    plan = Plan([RecipePlan("cfg", 10, 10)], list(range(10)), [str(i) for i in range(10)], 0)
    assert [r.name for r in classifier_runs(cfg, plan)] == ["cfg-synthetic", "cfg-synthetic-s1"]
