"""End to end: `factory run` on a tiny digits plan through a real local Ray."""

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

from factory.cli import main

TINY = {
    "name": "tiny",
    "seed": 3,
    "data": {"source": "digits"},
    "sampling": {"steps": 5, "shard_size": 6},
    "executor": {"num_actors": [1, 2]},
    "recipes": {"cfg": {"cfg_scale": 2.0, "images_per_class": 12}},
}


def _write(tmp_path, data, name="tiny.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _files(root):
    return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, fs in os.walk(root) for f in fs if "/_stats" not in d and f.endswith((".parquet", ".tar"))}


@pytest.fixture(scope="module")
def first_run(local_ray, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    out = str(tmp / "out")
    assert main(["run", _write(tmp, TINY), "--output", out, "--quiet"]) == 0
    return tmp, out


def test_layout_and_metrics(first_run):
    _, out = first_run
    assert sorted(os.listdir(out)) == ["_references", "_score", "_stages", "cfg", "factory.log", "metrics.json",
                                       "report.html", "run.json"]
    stages = {f: json.load(open(f"{out}/_stages/{f}")) for f in os.listdir(f"{out}/_stages") if f.endswith(".json")}
    assert sorted(stages) == ["references.json", "report.json", "sample.json", "score.json"]  # downstream: off
    made_for = json.load(open(f"{out}/_stages/shards/cfg.json"))["made_for"]  # what the cfg shards were made with
    assert made_for["seed"] == 3 and made_for["recipe"]["cfg_scale"] == 2.0 and made_for["sampling"]["steps"] == 5
    assert stages["sample.json"]["shards"] == {"planned": 20, "made": 20, "already_complete": 0}
    assert all(r["wall_seconds"] >= 0 for r in stages.values())
    assert sorted(os.listdir(f"{out}/_references")) == ["meta.json", "test", "train"]
    assert len(os.listdir(f"{out}/cfg/parquet")) == 20 and len(os.listdir(f"{out}/cfg/webdataset")) == 20
    metrics = json.load(open(f"{out}/metrics.json"))
    assert set(metrics) == {"real", "cfg"}
    m = metrics["cfg"]
    assert m["num_images"] == 120 and set(m["count_per_class"].values()) == {12}
    for key in ("precision", "recall", "density", "coverage", "f1_pc", "fd", "hardness_mean"):
        assert np.isfinite(m[key])
    assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["coverage"] <= 1.0
    assert len(m["per_class"]) == 10 and {"pooled", "fd", "per_class"} <= set(m["views"])
    assert "<table>" in open(f"{out}/report.html").read()


def test_shards_read_back_with_stock_libraries(first_run, tmp_path):
    _, out = first_run
    table = pq.read_table(f"{out}/cfg/parquet/c00004-s00001.parquet")
    assert table.num_rows == 6 and set(table.column("label").to_pylist()) == {4}
    assert table.column("key").to_pylist()[0] == "cfg_c00004_0000006"
    samples = list(wds.WebDataset(f"{out}/cfg/webdataset/c00004-s00001.tar", shardshuffle=False)
                   .decode("pill").to_tuple("png", "cls", "json"))  # "pill": mode L
    assert len(samples) == 6
    img, cls, meta = samples[0]
    assert img.size == (8, 8) and img.mode == "L" and cls == 4 and meta["class_name"] == "4"
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=f"{out}/cfg/parquet/*.parquet", split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 120 and sorted(set(ds["class_name"])) == [str(i) for i in range(10)]


def test_rerun_rewrites_nothing(first_run):
    tmp, out = first_run
    before = _files(out)
    scored = os.stat(f"{out}/_score/metrics.json").st_mtime_ns
    assert main(["run", _write(tmp, TINY), "--output", out, "--quiet"]) == 0
    assert _files(out) == before
    assert os.stat(f"{out}/_score/metrics.json").st_mtime_ns == scored  # nothing new to score: kept
    assert json.load(open(f"{out}/run.json"))["shards"] == {"planned": 20, "made": 0, "already_complete": 20}


def test_same_config_same_bytes(first_run):
    tmp, out = first_run
    other = str(tmp / "again")
    assert main(["run", _write(tmp, TINY), "--output", other, "--quiet"]) == 0
    for rel in _files(out):
        assert open(os.path.join(out, rel), "rb").read() == open(os.path.join(other, rel), "rb").read(), rel


def test_stages_rescore_and_report_without_resampling(first_run, tmp_path, capsys):
    tmp, out = first_run
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    before = _files(copy)
    sample_marker = open(f"{copy}/_stages/sample.json").read()
    config = _write(tmp, TINY)
    assert main(["run", config, "--output", copy, "--quiet", "--stages", "score,report", "--set", "eval.k=3"]) == 0
    assert _files(copy) == before and open(f"{copy}/_stages/sample.json").read() == sample_marker
    metrics = json.load(open(f"{copy}/metrics.json"))
    assert metrics["cfg"]["views"]["pooled"].endswith("k = 3")
    assert json.load(open(f"{out}/metrics.json"))["cfg"]["views"]["pooled"].endswith("k = 5")
    at_k5 = json.load(open(f"{out}/metrics.json"))["cfg"]
    assert any(metrics["cfg"][key] != at_k5[key] for key in ("precision", "recall", "density", "coverage"))
    # the report alone: rebuilt from the artifacts, the score's metrics untouched
    os.remove(f"{copy}/report.html")
    score = os.stat(f"{copy}/_score/metrics.json").st_mtime_ns
    assert main(["run", config, "--output", copy, "--quiet", "--stages", "report"]) == 0
    assert os.path.exists(f"{copy}/report.html") and os.stat(f"{copy}/_score/metrics.json").st_mtime_ns == score
    assert json.load(open(f"{copy}/run.json"))["shards"] == json.loads(sample_marker)["shards"]


def test_a_resume_with_another_recipe_config_is_refused_before_anything_is_written(first_run, tmp_path, capsys):
    tmp, out = first_run
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    before, record = _files(copy), open(f"{copy}/run.json").read()
    changed = {**TINY, "recipes": {"cfg": {"cfg_scale": 3.0, "images_per_class": 12}}}
    assert main(["run", _write(tmp_path, changed), "--output", copy, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{copy}/cfg holds shards made with another config (recipe.cfg_scale: 2.0 -> 3.0)" in err, err[-2000:]
    assert "new --output" in err
    assert main(["run", _write(tmp_path, TINY), "--output", copy, "--quiet", "--set", "seed=4"]) == 2
    assert "(seed: 3 -> 4)" in capsys.readouterr().err
    assert _files(copy) == before and open(f"{copy}/run.json").read() == record  # the old run's record stands
    # more images a class and a new recipe only add shards: resumed, the old ones kept byte for byte
    grown = {**TINY, "recipes": {"cfg": {"cfg_scale": 2.0, "images_per_class": 18},
                                 "plain": {"cfg_scale": 1.0, "images_per_class": 6}}}
    assert main(["run", _write(tmp_path, grown), "--output", copy, "--quiet"]) == 0
    after = _files(copy)
    assert {k: after[k] for k in before} == before and len(after) == len(before) * 2  # 20 shards, then 40
    assert json.load(open(f"{copy}/run.json"))["shards"]["already_complete"] == 20


def test_a_stage_without_its_inputs_names_the_stage_to_run(local_ray, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", _write(tmp_path, TINY), "--output", str(out), "--quiet", "--stages", "score"]) == 2
    err = capsys.readouterr().err
    assert "score needs the sample stage's shards: run --stages sample first" in err, err[-2000:]
    assert _shard_files(out) == []


def test_unknown_stage_exits_2_naming_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", _write(tmp_path, TINY), "--output", str(out), "--stages", "sample,scoring"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'scoring'" in err and "references,sample,score,downstream,report" in err
    assert not out.exists()


def test_run_without_output_writes_runs_config_stem(local_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = {**TINY, "data": {"source": "digits", "classes": ["2"]}, "sampling": {"steps": 2, "shard_size": 4},
            "recipes": {"cfg": {"cfg_scale": 2.0, "images_per_class": 4}}}
    config = _write(tmp_path, data, name="mini.yaml")
    assert main(["run", config, "--quiet"]) == 0
    out = tmp_path / "runs" / "mini"
    assert json.load(open(out / "run.json"))["state"] == "complete"
    assert json.load(open(out / "metrics.json"))["cfg"]["num_images"] == 4


@pytest.mark.parametrize("change, message", [
    ({"sampling": {"steps": 5, "shard_size": 6, "bogus": 1}}, "unknown key sampling.'bogus'"),
    ({"data": {"source": "digits", "classes": ["3", "eleven"]}}, "unknown class 'eleven'"),
    ({"backbone": {"name": "tiny", "checkpoint": "/nonexistent/folder"}}, "no unet checkpoint"),
    ({"features": {"name": "cnn", "checkpoint": "/nonexistent/cnn"}}, "no cnn checkpoint"),
    ({"backbone": {"name": "sd15", "checkpoint": "./no/such/sd15"}}, "neither a local folder nor a hub id"),
    ({"features": {"name": "dinov2", "checkpoint": "/nonexistent/dino"}}, "neither a local folder nor a hub id"),
])
def test_bad_input_exits_nonzero_and_writes_nothing(local_ray, tmp_path, capsys, change, message):
    out = tmp_path / "out"
    assert main(["run", _write(tmp_path, {**TINY, **change}), "--output", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_factory_eval_scores_written_shards_like_the_run(first_run, capsys):
    _, out = first_run
    expected = json.load(open(f"{out}/metrics.json"))["cfg"]
    for source, folder in (("parquet", "parquet"), ("webdataset", "webdataset")):
        assert main(["eval", source, f"{out}/cfg/{folder}", "--work", f"{out}-eval", "--quiet"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["num_images"] == 120
        for key in ("precision", "recall", "coverage", "fd"):
            assert got[key] == pytest.approx(expected[key], abs=1e-9), key
    assert main(["eval", "imagefolder", f"{out}/nowhere", "--work", f"{out}-eval"]) == 2
    assert "not found" in capsys.readouterr().err


def test_factory_eval_of_an_image_folder_matches_and_names_a_bad_image(first_run, tmp_path, capsys):
    _, out = first_run
    folder = tmp_path / "set"
    table = pq.read_table(f"{out}/cfg/parquet", columns=["key", "image", "class_name"])
    for key, image, name in zip(*(table.column(c).to_pylist() for c in ("key", "image", "class_name"))):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / f"{key}.png").write_bytes(image["bytes"])
    work = str(tmp_path / "work")
    assert main(["eval", "imagefolder", str(folder), "--work", work, "--quiet"]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = json.load(open(f"{out}/metrics.json"))["cfg"]
    assert got["num_images"] == 120 and got["precision"] == pytest.approx(expected["precision"], abs=1e-9)
    from PIL import Image

    Image.fromarray(np.zeros((9, 9), np.uint8), "L").save(folder / "3" / "odd.png")
    assert main(["eval", "imagefolder", str(folder), "--work", work, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "odd.png is 9x9, the real set's are 8x8" in err, err[-2000:]


def _shard_files(root):
    """Shard data and completion markers (run.json, written first, and a failed shard's _errors/ record are not)."""
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
            if f.endswith((".parquet", ".tar")) or os.path.basename(d) == "_stats"]


def test_nan_during_sampling_names_it_and_commits_nothing(local_ray, tmp_path, capsys):
    # a guidance step of 1e300 overflows x0 to inf, and the shard's images to NaN
    blowup = {"cfg": {"cfg_scale": 1.0, "images_per_class": 6,
                      "energies": [{"name": "chamfer", "weight": 1e300, "params": {"k": 4}}]}}
    data = {**TINY, "data": {"source": "digits", "classes": ["7"]}, "recipes": blowup}
    out = tmp_path / "out"
    assert main(["run", _write(tmp_path, data), "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "NaN or Inf" in err and "cfg/c00007-s00000" in err, err[-2000:]
    assert _shard_files(out) == []


def test_unwritable_output_is_named_before_any_work(local_ray, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["run", _write(tmp_path, TINY), "--output", str(blocker / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and str(blocker / "out") in err, err[-2000:]


@pytest.mark.parametrize("bad, message", [
    ("size", "expected 8x8"),
    ("corrupt", "corrupt or unreadable image"),
])
def test_bad_reference_images_exit_nonzero_and_write_nothing(local_ray, tmp_path, capsys, bad, message):
    from PIL import Image

    root = tmp_path / "refs"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8), "L").save(root / split / cls / f"{i}.png")
    target = root / "train" / "b" / "1.png"
    if bad == "size":
        Image.fromarray(np.zeros((9, 9), np.uint8), "L").save(target)
    else:
        target.write_bytes(b"\x89PNG truncated")
    data = {**TINY, "data": {"source": "imagefolder", "root": str(root)}}
    out = tmp_path / "out"
    assert main(["run", _write(tmp_path, data), "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err, err[-2000:]
    assert not out.exists()
