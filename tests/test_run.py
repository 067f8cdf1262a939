"""End to end: `factory run` on a tiny digits plan through a real local Ray."""

import json
import os

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
    assert sorted(os.listdir(out)) == ["_references", "cfg", "factory.log", "metrics.json", "report.html", "run.json"]
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
    assert main(["run", _write(tmp, TINY), "--output", out, "--quiet"]) == 0
    assert _files(out) == before
    assert json.load(open(f"{out}/run.json"))["shards"] == {"planned": 20, "made": 0, "already_complete": 20}


def test_same_config_same_bytes(first_run):
    tmp, out = first_run
    other = str(tmp / "again")
    assert main(["run", _write(tmp, TINY), "--output", other, "--quiet"]) == 0
    for rel in _files(out):
        assert open(os.path.join(out, rel), "rb").read() == open(os.path.join(other, rel), "rb").read(), rel


@pytest.mark.parametrize("change, message", [
    ({"sampling": {"steps": 5, "shard_size": 6, "bogus": 1}}, "unknown key sampling.'bogus'"),
    ({"data": {"source": "digits", "classes": ["3", "eleven"]}}, "unknown class 'eleven'"),
    ({"backbone": {"name": "tiny", "checkpoint": "/nonexistent/folder"}}, "no unet checkpoint"),
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
        assert main(["eval", source, f"{out}/cfg/{folder}"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["num_images"] == 120
        for key in ("precision", "recall", "coverage", "fd"):
            assert got[key] == pytest.approx(expected[key], abs=1e-9), key
    assert main(["eval", "imagefolder", f"{out}/nowhere"]) == 2
    assert "not found" in capsys.readouterr().err


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
