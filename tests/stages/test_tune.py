"""The tune stage: a validation carve of the train split, Ray Tune pilot trials, and the run using the choice."""

import json
import os

import numpy as np
import pytest
import yaml

from factory.cli import main
from factory.config import from_dict
from factory.data import load_real

JOB = {
    "name": "tuned",
    "seed": 1,
    "data": {"source": "digits", "classes": ["0", "1", "2"]},
    "sampling": {"steps": 5, "shard_size": 6},
    "executor": {"num_actors": [1, 1]},
    "output": {"formats": ["parquet"]},
    "recipes": {"chamfer": {
        "cfg_scale": 1.0, "images_per_class": 6,
        "energies": [{"name": "chamfer", "weight": 0.15, "every": 2, "params": {"k": 8}}],
        "tune": {"param": "energies.0.weight", "values": [0.02, 3.0], "objective": "f1_pc",
                 "pilot": {"classes": 2, "images_per_class": 5, "validation_per_class": 12,
                           "references_per_class": 40}},
    }},
}


@pytest.fixture(scope="module")
def tuned_run(local_ray, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    config = tmp / "job.yaml"
    config.write_text(yaml.safe_dump(JOB))
    out = str(tmp / "out")
    assert main(["run", str(config), "--output", out, "--quiet"]) == 0
    return str(config), out


def _trial_files(out):
    root = f"{out}/_tune/chamfer"
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


def test_the_run_samples_with_the_value_its_pilot_chose(tuned_run):
    _, out = tuned_run
    run = json.load(open(f"{out}/run.json"))
    t = run["tuning"]["chamfer"]
    assert [row["value"] for row in t["trials"]] == [0.02, 3.0] and t["written"] == 0.15
    best = max(t["trials"], key=lambda row: row["f1_pc"])
    assert t["chosen"] == best["value"]
    assert run["config"]["recipes"]["chamfer"]["energies"][0]["weight"] == t["chosen"]
    assert run["wall_seconds"]["tune"] > 0
    # each trial was a run of its own: its shards, bank and metrics under _tune/chamfer/<i>
    for i, row in enumerate(t["trials"]):
        metrics = json.load(open(f"{out}/_tune/chamfer/{i}/metrics.json"))
        assert metrics["f1_pc"] == row["f1_pc"] and 0 <= metrics["coverage"] <= 1
        assert metrics["label_agreement"] == row["label_agreement"] and 0 <= row["label_agreement"] <= 1
        assert len(os.listdir(f"{out}/_tune/chamfer/{i}/chamfer/parquet")) == 2  # 2 pilot classes, 1 shard each
    # a huge step and a tiny one make different sets: the trials are real runs, not one result twice
    assert t["trials"][0]["fd"] != t["trials"][1]["fd"]
    page = open(f"{out}/report.html").read()
    assert 'id="tuning"' in page and "energies.0.weight = " in page
    # 5 samples against 12 validation images a class: whether coverage saturated is said, in the record and page
    saturated = min(row["coverage"] for row in t["trials"]) >= 0.95
    assert ("warning" in t) == saturated and (not saturated or "coverage is saturated in the pilot" in page)


def test_the_carve_holds_train_images_only_split_in_two_disjoint_parts(tuned_run):
    _, out = tuned_run
    pilot = json.load(open(f"{out}/run.json"))["tuning"]["chamfer"]["pilot"]
    root = pilot["carve"]
    train, test = load_real("parquet", "train", root), load_real("parquet", "test", root)
    real_train, real_test = load_real("digits", "train"), load_real("digits", "test")
    assert train.class_names == real_train.class_names  # every class's label kept, for the conditional model
    labels = [real_train.class_names.index(c) for c in pilot["classes"]]
    assert sorted(set(test.labels)) == sorted(set(train.labels)) == labels
    assert np.bincount(test.labels)[labels].tolist() == [12, 12]
    assert np.bincount(train.labels)[labels].tolist() == [40, 40]
    as_bytes = lambda images: {i.tobytes() for i in images}
    assert as_bytes(test.images).isdisjoint(as_bytes(train.images))
    assert as_bytes(test.images) <= as_bytes(real_train.images)
    assert as_bytes(test.images).isdisjoint(as_bytes(real_test.images) - as_bytes(real_train.images))


def test_a_rerun_keeps_the_choice_and_reruns_no_trial(tuned_run):
    config, out = tuned_run
    before, marker = _trial_files(out), open(f"{out}/_stages/tune.json").read()
    assert main(["run", config, "--output", out, "--quiet"]) == 0
    assert _trial_files(out) == before and open(f"{out}/_stages/tune.json").read() == marker


def test_later_stages_alone_apply_the_recorded_choice(tuned_run, tmp_path, capsys):
    config, out = tuned_run
    assert main(["run", config, "--output", out, "--quiet", "--stages", "score,report"]) == 0
    run = json.load(open(f"{out}/run.json"))
    assert run["config"]["recipes"]["chamfer"]["energies"][0]["weight"] == run["tuning"]["chamfer"]["chosen"]
    # without the tune stage's record, a stage names it
    fresh = str(tmp_path / "fresh")
    assert main(["run", config, "--output", fresh, "--quiet", "--stages", "references"]) == 2
    assert "needs the tune stage's tuned parameters: run --stages tune first" in capsys.readouterr().err


@pytest.mark.parametrize("tune, message", [
    ({"param": "energies.1.weight", "values": [0.1, 0.2]}, "tune.param: 'energies.1.weight' is not a parameter"),
    ({"param": "cfg_scale", "values": [0.5, 2.0]}, "tune.values: value 0.5 at cfg_scale: cfg_scale: must be >= 1.0"),
    ({"param": "energies.0.params.k", "values": [2, 8.5]}, "expected an integer, got 8.5"),
    ({"param": "energies.0.weight", "values": [0.1]}, "at least two values"),
    ({"param": "energies.0.weight", "values": [0.1, 0.2], "range": [0.1, 1.0]}, "either values"),
    ({"param": "energies.0.weight", "range": [0.0, 1.0]}, "low > 0 (log: true)"),
    ({"param": "images_per_class", "values": [5, 10]}, "cannot be tuned"),
    ({"param": "cfg_scale", "values": [1.0, 2.0], "objective": "accuracy"}, "tune.objective: unknown value"),
])
def test_a_bad_tune_names_the_key_before_any_work(tune, message):
    data = json.loads(json.dumps(JOB))
    data["recipes"]["chamfer"]["tune"] = tune
    with pytest.raises(ValueError, match="recipes.chamfer.tune") as e:
        from_dict(data)
    assert message in str(e.value)


def test_a_range_is_a_rounded_geometric_grid():
    data = json.loads(json.dumps(JOB))
    data["recipes"]["chamfer"]["tune"] = {"param": "energies.0.weight", "range": [0.05, 0.8], "trials": 5}
    assert from_dict(data).recipes["chamfer"].tune.grid() == [0.05, 0.1, 0.2, 0.4, 0.8]
    data["recipes"]["chamfer"]["tune"].update(log=False, range=[1.0, 2.0], trials=3, param="cfg_scale")
    assert from_dict(data).recipes["chamfer"].tune.grid() == [1.0, 1.5, 2.0]


def test_a_pilot_whose_coverage_saturates_says_the_choice_cannot_rank_the_values():
    from factory.stages.tune import saturation

    rows = [{"value": v, "coverage": c, "fd": 0.3} for v, c in [(0.03, 0.987), (0.05, 0.967), (0.1, 0.967)]]
    message = saturation(rows, "f1_pc", 20, 30)
    assert "30 validation images a class are too few to rank 20 samples" in message
    assert "validation_per_class" in message and ">= 0.97" in message
    assert saturation(rows, "fd", 20, 30) is None  # FD does not saturate so
    rows[2]["coverage"] = 0.478  # a validation split large enough tells the values apart
    assert saturation(rows, "coverage", 200, 1000) is None


def test_factory_plan_names_the_pilot_runs_a_tune_adds():
    from factory.plan import estimate

    notes = estimate(from_dict(JOB)).get("notes")
    assert ("chamfer: tune energies.0.weight: 2 pilot runs of 2 classes x 5 images (20 images, sampled like the "
            "recipe) before the run, not in the hours above") in notes

    job = {**JOB, "recipes": {"chamfer": {**JOB["recipes"]["chamfer"], "candidates": 2,
                                          "tune": {**JOB["recipes"]["chamfer"]["tune"], "param": "candidates",
                                                   "values": [1, 3, 5]}}}}
    notes = estimate(from_dict(job)).get("notes")
    assert ("chamfer: tune candidates: 3 pilot runs of 2 classes x 5 images (90 images in 9 candidate sets, sampled "
            "like the recipe) before the run, not in the hours above") in notes
