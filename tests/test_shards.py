import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from factory.shards import ShardSink, encode_parquet, encode_webdataset


def _records(n=5, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
        out.append({"key": f"cfg_c00001_{i:07d}", "image": buf.getvalue(), "label": 1, "class_name": "1", "seed": 42})
    return out


def test_encoders_are_deterministic():
    assert encode_parquet(_records()) == encode_parquet(_records())
    assert encode_webdataset(_records()) == encode_webdataset(_records())
    assert encode_parquet(_records(seed=1)) != encode_parquet(_records())


def test_commit_reads_back_with_stock_libraries(tmp_path):
    sink = ShardSink(str(tmp_path), ["parquet", "webdataset"])
    records = _records()
    stats = sink.commit("cfg", "c00001-s00000", records, {"label": 1})
    assert stats["num_images"] == 5 and set(stats["files"]) == {"parquet", "webdataset"}
    assert sink.completed("cfg") == {"c00001-s00000"} and sink.is_complete("cfg", "c00001-s00000")
    table = pq.read_table(tmp_path / "cfg/parquet/c00001-s00000.parquet")
    assert table.column_names == ["key", "image", "label", "class_name", "seed"]
    assert table.column("image").to_pylist()[2] == {"bytes": records[2]["image"], "path": f"{records[2]['key']}.png"}
    samples = list(wds.WebDataset(str(tmp_path / "cfg/webdataset/c00001-s00000.tar"), shardshuffle=False)
                   .decode("pil").to_tuple("__key__", "png", "cls", "json"))
    assert [s[0] for s in samples] == [r["key"] for r in records]
    key, img, cls, meta = samples[0]
    assert img.size == (8, 8) and cls == 1 and meta["class_name"] == "1"
    # no temporary file is left beside the committed ones
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if ".tmp-" in f]


def test_huggingface_datasets_reads_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    sink = ShardSink(str(tmp_path), ["parquet"])
    sink.commit("cfg", "c00001-s00000", _records(3), {})
    sink.commit("cfg", "c00001-s00001", _records(2, seed=1), {})
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "cfg/parquet/*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 5 and ds[0]["label"] == 1


def test_unwritable_output_names_the_uri(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="is not writable"):
        ShardSink(str(blocker / "out"), ["parquet"]).check_writable()
