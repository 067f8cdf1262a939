"""Hugging Face-native output: the Parquet Image struct + ClassLabel, the dataset card, the codec choice."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

from factory.cli import main
from factory.config import ConfigError, from_dict
from factory.data import decode_image, image_bytes, load_real
from factory.shards import encode_image
from factory.shards import ShardSink, encode_parquet, encode_webdataset

DIGITS = [str(i) for i in range(10)]
# Two classes of the ten, one shard each: the ClassLabel must still name all ten, in label order.
TINY = {
    "name": "tinyhf",
    "seed": 5,
    "data": {"source": "digits", "classes": ["3", "7"]},
    "sampling": {"steps": 4, "shard_size": 6},
    "executor": {"num_actors": [1, 1]},
    "output": {"codec": "webp", "quality": 80},  # lossy, and no grey mode: scoring must convert back to L
    "recipes": {"cfg": {"cfg_scale": 2.0, "images_per_class": 6}},
}


@pytest.fixture(scope="module")
def hf_run(local_ray, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    cfg = tmp / "tinyhf.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = str(tmp / "out")
    assert main(["run", str(cfg), "--output", out, "--quiet"]) == 0
    return out


def _digit_arrays(n=4):
    return load_real("digits", "train").images[:n]


def _records(codec, n=3):
    return [{"key": f"cfg_c00001_{i:07d}", "image": encode_image(a, codec, 90), "label": 1, "class_name": "1",
             "seed": 7} for i, a in enumerate(_digit_arrays(n))]


@pytest.mark.parametrize("codec", ["png", "jpeg", "webp"])
def test_codecs_are_deterministic_and_decode(codec):
    rng = np.random.default_rng(0)
    for a in (_digit_arrays(1)[0], rng.integers(0, 255, (28, 28), np.uint8), rng.integers(0, 255, (64, 64, 3), np.uint8)):
        data = encode_image(a, codec, 90)
        assert data == encode_image(a.copy(), codec, 90)
        img = decode_image(data, "x")
        assert img.size == (a.shape[1], a.shape[0])
        back = np.asarray(img.convert("L" if a.ndim == 2 else "RGB"))
        if codec == "png":
            assert np.array_equal(back, a)
    a = _digit_arrays(1)[0]
    if codec != "png":
        assert encode_image(a, codec, 30) != encode_image(a, codec, 95)


def test_codec_config_is_validated():
    assert from_dict({}).output.codec == "png"
    with pytest.raises(ConfigError, match="output.codec"):
        from_dict({"output": {"codec": "gif"}})
    with pytest.raises(ConfigError, match="output.quality"):
        from_dict({"output": {"codec": "jpeg", "quality": 101}})


@pytest.mark.parametrize("codec,ext", [("png", "png"), ("jpeg", "jpg"), ("webp", "webp")])
def test_sink_writes_hf_features_and_codec_extensions(tmp_path, codec, ext):
    datasets = pytest.importorskip("datasets")
    records = _records(codec)
    sink = ShardSink(str(tmp_path), ["parquet", "webdataset"], class_names=DIGITS)
    sink.commit("cfg", "c00001-s00000", records, {})
    # shard bytes stay a function of the records
    assert encode_parquet(records, DIGITS) == encode_parquet(_records(codec), DIGITS)
    assert encode_webdataset(records) == encode_webdataset(_records(codec))

    path = tmp_path / "cfg/parquet/c00001-s00000.parquet"
    schema = pq.read_schema(path)
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["label"] == {"names": DIGITS, "_type": "ClassLabel"}
    # exactly what datasets itself writes for these features
    expected = datasets.Features({"key": datasets.Value("string"), "image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=DIGITS), "class_name": datasets.Value("string"),
                                  "seed": datasets.Value("int64")})
    assert datasets.Features.from_arrow_schema(schema) == expected
    table = pq.read_table(path)
    values = table.column("image").to_pylist()
    assert [image_bytes(v) for v in values] == [r["image"] for r in records]
    assert values[0]["path"] == f"{records[0]['key']}.{ext}"

    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.features["label"].names == DIGITS
    img = ds[0]["image"]
    assert isinstance(img, Image.Image) and img.size == (8, 8)
    assert ds.features["label"].int2str(ds[0]["label"]) == "1"

    samples = list(wds.WebDataset(str(tmp_path / "cfg/webdataset/c00001-s00000.tar"), shardshuffle=False)
                   .decode("pil").to_tuple("__key__", ext, "cls"))
    assert [s[0] for s in samples] == [r["key"] for r in records] and samples[0][1].size == (8, 8)
    # the factory's own readers, both formats
    for source in ("parquet", "webdataset"):
        real = load_real(source, "train", str(tmp_path / "cfg" / source))
        assert real.images.shape[:3] == (3, 8, 8) and list(real.labels) == [1, 1, 1]


def test_readers_accept_plain_binary_parquet(tmp_path):
    """Shards written before the Image struct (plain binary ``image``) still read."""
    records = _records("png")
    table = pa.table({"key": [r["key"] for r in records], "image": pa.array([r["image"] for r in records], pa.binary()),
                      "label": [1] * 3, "class_name": ["1"] * 3, "seed": [7] * 3})
    (tmp_path / "old").mkdir()
    pq.write_table(table, tmp_path / "old/a.parquet")
    real = load_real("parquet", "train", str(tmp_path / "old"))
    assert np.array_equal(real.images, _digit_arrays(3))


def test_run_output_loads_as_a_hf_dataset(hf_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = hf_run
    assert sorted(os.listdir(f"{out}/cfg/webdataset"))[0].endswith(".tar")
    with open(f"{out}/cfg/webdataset/c00003-s00000.tar", "rb") as f:
        import tarfile

        names = tarfile.open(fileobj=f).getnames()
    assert names[0] == "cfg_c00003_0000000.webp"
    ds = datasets.load_dataset(f"{out}/cfg", split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 12 and ds.features["label"].names == DIGITS
    assert sorted(set(ds["label"])) == [3, 7] and sorted(set(ds["class_name"])) == ["3", "7"]
    img = ds[0]["image"]
    assert isinstance(img, Image.Image) and img.size == (8, 8)
    # the same through data_files, as the issue tried it
    ds2 = datasets.load_dataset("parquet", data_files=f"{out}/cfg/parquet/*.parquet", split="train",
                                cache_dir=str(tmp_path / "hf2"))
    assert ds2.features["label"].names == DIGITS
    metrics = json.load(open(f"{out}/metrics.json"))
    assert metrics["cfg"]["num_images"] == 12 and np.isfinite(metrics["cfg"]["fd"])


def test_dataset_card(hf_run):
    out = hf_run
    text = open(f"{out}/cfg/README.md").read()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["configs"] == [{"config_name": "default",
                                  "data_files": [{"split": "train", "path": "parquet/*.parquet"}]}]
    label = next(f for f in header["dataset_info"]["features"] if f["name"] == "label")
    assert label["dtype"]["class_label"]["names"] == {str(i): str(i) for i in range(10)}
    assert header["dataset_info"]["splits"] == [{"name": "train", "num_examples": 12}]
    # the card declares exactly the shards' columns (load_dataset(folder) casts the files to these)
    schema = pq.read_schema(f"{out}/cfg/parquet/c00003-s00000.parquet")
    assert [f["name"] for f in header["dataset_info"]["features"]] == schema.names
    run = json.load(open(f"{out}/run.json"))
    body = text.split("---\n", 2)[2]
    metrics = json.load(open(f"{out}/metrics.json"))
    for needle in ("tiny", "seed 5", "webp, quality 80", "CFG scale 2", f"{metrics['cfg']['precision']:.3f}"):
        assert needle in body, needle
    if run.get("code_revision"):
        assert run["code_revision"] in body
    hub = pytest.importorskip("huggingface_hub")
    card = hub.DatasetCard.load(f"{out}/cfg/README.md")
    data = card.data.to_dict()
    assert data["task_categories"] == ["image-classification"] and data["configs"] == header["configs"]
    assert "## Metrics" in card.text


def test_plan_prints_the_storage_estimate():
    from factory.plan import BYTES_PER_IMAGE, estimate, format_estimate

    data = {"data": {"source": "digits", "num_classes": 10}, "recipes": {"cfg": {"images_per_class": 100}}}
    est = estimate(from_dict(data))
    # parquet: the image; webdataset: 3 tar headers + the image padded to a 512 B block + .cls and .json blocks
    assert est["storage"]["per_format"] == {"parquet": BYTES_PER_IMAGE[8]["png"], "webdataset": 3 * 512 + 512 + 1024}
    assert est["storage"]["bytes"] == 1000 * (BYTES_PER_IMAGE[8]["png"] + 3072)
    assert "storage: " in format_estimate(est)
    webp = estimate(from_dict({**data, "output": {"codec": "webp", "formats": ["parquet"]}}))
    assert webp["storage"]["bytes"] == 1000 * BYTES_PER_IMAGE[8]["webp"]
    # 512 px, declared: scaled by area from the measured 256 px
    big = estimate(from_dict({**data, "data": {**data["data"], "image_size": 512}, "output": {"codec": "jpeg"}}))
    assert big["storage"]["bytes_per_image"] == BYTES_PER_IMAGE[256]["jpeg"] * 4
    assert "scaled by area from 256 px" in big["storage"]["source"]
