"""`factory prepare`: an ImageNet-layout folder, WebDataset tars and Parquet files into the factory's real-set
Parquet layout, through a real local Ray; the result reads back with pyarrow and `load_real`, and runs."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from factory.cli import main
from factory.data import DataError, load_real

CLASSES = ["n01440764", "n01443537", "n01484850"]
SIZES = [(12, 10), (10, 16), (8, 8), (20, 20), (9, 13)]  # (h, w): mixed sizes and aspect ratios


def _imagenet_folder(root):
    """train/<wnid>/*.JPEG (5 good per class) + val/<wnid>/* (3 per class), mostly grey; plus odd files."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 3)):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, SIZES[i % len(SIZES)], dtype=np.uint8)
                Image.fromarray(img, "L").save(d / f"{c}_{i}.JPEG", "JPEG")
    train = root / "train"
    (train / CLASSES[0] / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (train / CLASSES[0] / "empty.JPEG").write_bytes(b"")
    Image.new("L", (1, 1)).save(train / CLASSES[1] / "tiny.png")  # under --size // 4: too small
    Image.new("RGB", (10, 12), (200, 10, 10)).save(train / CLASSES[1] / "colour.png")  # converted to L
    Image.new("CMYK", (10, 10), (0, 50, 50, 0)).save(train / CLASSES[2] / "cmyk.jpg")
    Image.new("P", (11, 9)).save(train / CLASSES[2] / "palette.png")
    (train / CLASSES[2] / "notes.txt").write_text("not an image")


def _files(root):
    return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, fs in os.walk(root) for f in fs}


def _prepare(capsys, src, out, *args):
    assert main(["prepare", str(src), "--output", str(out), "--quiet", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def imagenet(local_ray, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prepare")
    _imagenet_folder(tmp / "src")
    out = tmp / "out"
    assert main(["prepare", str(tmp / "src"), "--output", str(out), "--size", "8", "--rows-per-file", "3",
                 "--quiet"]) == 0
    return tmp, out


def test_imagenet_layout_reads_back(imagenet):
    tmp, out = imagenet
    assert sorted(os.listdir(out)) == ["_SUCCESS", "_parts", "_prepare.json", "_rejected.jsonl", "classes.json",
                                       "test", "train"]
    # bounded files named by their unit: class c00002 has 7 train images -> 3 + 3 + 1
    assert sorted(os.listdir(out / "train")) == [f"c{c:05d}-{j:05d}.parquet" for c, n in ((0, 2), (1, 2), (2, 3))
                                                 for j in range(n)]
    table = pq.read_table(out / "train" / "c00002-00002.parquet")
    assert table.num_rows == 1 and set(table.column_names) >= {"key", "image", "label", "class_name"}
    for f in (out / "train").iterdir():
        assert pq.read_table(f).num_rows <= 3

    train, test = load_real("parquet", "train", str(out)), load_real("parquet", "test", str(out))
    assert train.mode == test.mode == "L" and train.size == test.size == (8, 8)  # the majority (grey) mode
    assert train.class_names == test.class_names == CLASSES
    assert np.bincount(train.labels).tolist() == [5, 6, 7]  # colour (n01443537), cmyk + palette (n01484850)
    assert np.bincount(test.labels).tolist() == [3, 3, 3]
    index = json.load(open(out / "classes.json"))
    assert index["class_names"] == CLASSES and index["mode"] == "L" and index["size"] == [8, 8]
    assert index["counts"] == {"train": [5, 6, 7], "test": [3, 3, 3]}

    rejected = {os.path.basename(r["path"]): r["reason"] for r in map(json.loads, open(out / "_rejected.jsonl"))}
    assert set(rejected) == {"corrupt.JPEG", "empty.JPEG", "tiny.png", "notes.txt"}
    assert rejected["empty.JPEG"] == "empty file" and rejected["corrupt.JPEG"].startswith("unreadable")
    assert rejected["tiny.png"].startswith("too small: 1x1")

    # centre crop of a 16-wide, 10-high image: the resized middle, not the borders
    src = np.asarray(Image.open(tmp / "src" / "train" / CLASSES[0] / f"{CLASSES[0]}_1.JPEG"))
    want = np.asarray(Image.fromarray(src[:, 3:13]).resize((8, 8), Image.Resampling.BICUBIC), dtype=float)
    got = [img for img, lbl in zip(train.images, train.labels) if lbl == 0][1].astype(float)
    assert np.abs(got - want).mean() < 8


def test_rerun_does_nothing_and_a_killed_run_resumes(imagenet, capsys):
    tmp, out = imagenet
    before = _files(out)
    summary = _prepare(capsys, tmp / "src", out, "--size", 8, "--rows-per-file", 3)
    assert summary["already_complete"] and _files(out) == before

    # a run killed after some units: their markers exist, the rest (and _SUCCESS) do not
    os.remove(out / "_SUCCESS")
    os.remove(out / "_parts" / "train-c00001.json")
    os.remove(out / "train" / "c00001-00001.parquet")
    summary = _prepare(capsys, tmp / "src", out, "--size", 8, "--rows-per-file", 3)
    assert summary["units"] == {"planned": 6, "made": 1, "already_complete": 5}
    after = _files(out)
    assert set(after) == set(before)
    untouched = [f for f in before if "c00001" not in f and not f.startswith(("_SUCCESS", "_rejected", "classes"))]
    assert all(after[f] == before[f] for f in untouched)

    # other parameters over the same output: refused, naming them
    assert main(["prepare", str(tmp / "src"), "--output", str(out), "--size", "16", "--quiet"]) == 2
    assert "size" in capsys.readouterr().err


def test_per_class_is_seeded_and_takes_the_next_readable_image(imagenet, capsys):
    tmp, _ = imagenet
    keys = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        _prepare(capsys, tmp / "src", tmp / f"k{name}", "--size", 8, "--per-class", 2, "--seed", seed)
        keys[name] = sorted(k for f in (tmp / f"k{name}" / "train").iterdir()
                            for k in pq.read_table(f).column("key").to_pylist())
    train = load_real("parquet", "train", str(tmp / "ka"))
    assert np.bincount(train.labels).tolist() == [2, 2, 2]
    assert np.bincount(load_real("parquet", "test", str(tmp / "ka")).labels).tolist() == [3, 3, 3]  # test whole
    assert keys["a"] == keys["b"] != keys["c"]
    # K = every readable image of the class with the corrupt and the empty file, which rank among its first 5
    from factory.prepare import _hash

    first = sorted(os.listdir(tmp / "src" / "train" / CLASSES[0]),
                   key=lambda n: _hash(0, "keep", f"train/{CLASSES[0]}/{n}"))[:5]
    assert {"corrupt.JPEG", "empty.JPEG"} <= set(first)
    summary = _prepare(capsys, tmp / "src", tmp / "k5", "--size", 8, "--per-class", 5)
    assert summary["images"]["train"] == 15


def test_the_prepared_set_runs(imagenet, tmp_path, capsys):
    """A tiny `factory run` reads the prepared set unchanged: 8x8 grey, the digits UNet and CNN."""
    _, out = imagenet
    job = {"name": "prepared", "seed": 0, "data": {"source": "parquet", "root": str(out)},
           "backbone": {"name": "tiny", "checkpoint": "digits"}, "features": {"name": "cnn", "checkpoint": "digits"},
           "sampling": {"steps": 2, "shard_size": 3}, "executor": {"num_actors": [1, 1]}, "eval": {"k": 2},
           "output": {"formats": ["parquet"]}, "recipes": {"cfg": {"cfg_scale": 2.0, "images_per_class": 3}}}
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(job))
    assert main(["run", str(cfg), "--output", str(tmp_path / "run"), "--quiet"]) == 0
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert metrics["cfg"]["num_images"] == 9 and sorted(metrics["cfg"]["count_per_class"]) == CLASSES


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_input_pad(local_ray, tmp_path, capsys):
    src = tmp_path / "wds"
    for split, n in (("train", 4), ("val", 2)):
        (src / split).mkdir(parents=True)
        with tarfile.open(src / split / "shard-000.tar", "w") as tar:
            for i in range(n):
                label = i % 2
                members = {"png": _png(np.full((12, 16, 3), 200, np.uint8)), "cls": str(label).encode(),
                           "json": json.dumps({"class_name": ["cat", "dog"][label]}).encode()}
                if split == "train" and i == 3:
                    del members["cls"]  # no label: reported, not fatal
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    summary = _prepare(capsys, src, out, "--size", 8, "--resize", "pad")
    assert summary["images"] == {"train": 3, "test": 2} and summary["rejected"] == 1
    train = load_real("parquet", "train", str(out))
    assert train.mode == "RGB" and train.images.shape == (3, 8, 8, 3) and train.class_names == ["cat", "dog"]
    assert train.images[:, 0].max() == 0 and train.images[:, 4].min() > 150  # letterbox: black rows above
    (line,) = open(out / "_rejected.jsonl")
    assert "s003" in line and "label" in line
    assert sorted(os.listdir(out / "train")) == ["f00000-00000.parquet"]


def test_parquet_input_with_class_labels_split_and_per_class(local_ray, tmp_path, capsys):
    rng = np.random.default_rng(1)
    rows = {"image": [], "label": []}
    for i in range(12):
        rows["image"].append({"bytes": _png(rng.integers(0, 256, (10, 10), dtype=np.uint8)), "path": f"{i}.png"})
        rows["label"].append(i % 2)
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"names": ["ant", "bee"], "_type": "ClassLabel"}}}}
    table = pa.Table.from_pydict(rows).replace_schema_metadata({"huggingface": json.dumps(meta)})
    (tmp_path / "hf").mkdir()
    pq.write_table(table, tmp_path / "hf" / "data-00000.parquet")
    out = tmp_path / "out"
    summary = _prepare(capsys, tmp_path / "hf", out, "--size", 8, "--resize", "stretch", "--test-fraction", 0.5,
                       "--per-class", 2, "--seed", 3)
    train, test = load_real("parquet", "train", str(out)), load_real("parquet", "test", str(out))
    assert train.class_names == ["ant", "bee"] and train.mode == "L" and train.size == (8, 8)
    assert np.bincount(train.labels).tolist() == [2, 2]
    assert summary["images"]["test"] == len(test.labels) > 0 and len(test.labels) + 4 <= 12
    test_keys = {k for f in (out / "test").iterdir() for k in pq.read_table(f).column("key").to_pylist()}
    train_keys = {k for f in (out / "train").iterdir() for k in pq.read_table(f).column("key").to_pylist()}
    assert not test_keys & train_keys

    # no --test-fraction: train only, and the prepared set says so instead of reading train as test
    _prepare(capsys, tmp_path / "hf", tmp_path / "train-only", "--size", 8)
    assert len(load_real("parquet", "train", str(tmp_path / "train-only")).labels) == 12
    with pytest.raises(DataError, match="no test split"):
        load_real("parquet", "test", str(tmp_path / "train-only"))
