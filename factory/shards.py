"""Shard writers: Parquet + WebDataset through fsspec, committed atomically, stats file written last.

Layout under the run's output URI::

    <output>/<recipe>/parquet/<shard>.parquet     key, image {bytes, path}, label, class_name, seed[, features]
    <output>/<recipe>/webdataset/<shard>.tar      <key>.png|jpg|webp, <key>.cls, <key>.json
    <output>/<recipe>/_stats/<shard>.json         written last: the shard's completion marker

No partial object ever appears under a final name: on a local disk a file is written to a temporary
name in the same folder and renamed; on object storage it is one PUT (an object appears whole or not
at all). A shard whose stats file exists is complete, and a rerun skips it without touching its files.
This module knows nothing of diffusion: a shard's content arrives as records.

The Parquet files are Hugging Face ``datasets``-native: ``image`` is the ``datasets`` Image struct
``{bytes, path}`` and ``label`` a ClassLabel over the real set's class names, both declared in the schema's
``huggingface`` metadata (written with pyarrow; ``datasets`` is not needed to write or read them), so
``datasets.load_dataset("parquet", ...)`` yields PIL images and ``features["label"].names``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image's storage
PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", IMAGE_TYPE),
        ("label", pa.int64()),
        ("class_name", pa.string()),
        ("seed", pa.int64()),
    ]
)
SUFFIX = {"parquet": ".parquet", "webdataset": ".tar"}
WDS_MTIME = 0  # fixed tar member mtime: the same records give the same bytes


def image_extension(data: bytes) -> str:
    """The file extension of encoded image bytes (``png``, ``jpg`` or ``webp``) from their magic number;
    ``png`` for anything else (the factory's default codec)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "png"


def hf_features(class_names: list[str] | None = None) -> dict:
    """The ``datasets`` features of our Parquet columns, as ``datasets.Features.to_dict()`` writes them:
    ``label`` is a ClassLabel when the class names (all of the real set's, in label order) are known."""
    label = ({"names": [str(n) for n in class_names], "_type": "ClassLabel"} if class_names is not None
             else {"dtype": "int64", "_type": "Value"})
    return {"key": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"}, "label": label,
            "class_name": {"dtype": "string", "_type": "Value"}, "seed": {"dtype": "int64", "_type": "Value"}}


def parquet_schema(class_names: list[str] | None = None, feature_dim: int | None = None) -> pa.Schema:
    """PARQUET_SCHEMA with the ``huggingface`` metadata ``datasets`` reads its features from, and, with
    ``feature_dim``, the ``features`` column: each image's vector in the run's evaluation space (scoring reads
    it instead of decoding and re-embedding the pixels)."""
    features = hf_features(class_names)
    schema = PARQUET_SCHEMA
    if feature_dim:
        schema = schema.append(pa.field("features", pa.list_(pa.float32(), feature_dim)))
        features["features"] = {"feature": {"dtype": "float32", "_type": "Value"}, "length": feature_dim,
                                "_type": "List"}
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def encode_image(array: np.ndarray, codec: str = "png", quality: int = 90) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG, JPEG or WebP bytes (``quality`` 1-100 for the lossy two), with fixed
    encoder settings and no metadata, so the same array always gives the same bytes."""
    img = Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB")
    buf = io.BytesIO()
    if codec == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif codec == "jpeg":
        img.save(buf, format="JPEG", quality=quality, optimize=True, progressive=False, subsampling="4:2:0")
    elif codec == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4, lossless=False, exact=False)
    else:
        raise ValueError(f"unknown image codec {codec!r}; expected one of png, jpeg, webp")
    return buf.getvalue()


def encode_images(records: list[dict], codec: str = "png", quality: int = 90) -> list[dict]:
    """The writer's ``finish``: records whose ``image`` is a uint8 array -> the same records with its bytes."""
    return [{**r, "image": encode_image(r["image"], codec, quality)} if isinstance(r["image"], np.ndarray) else r
            for r in records]


def encode_parquet(records: list[dict], class_names: list[str] | None = None) -> bytes:
    """One Parquet file of ``records`` (``image``: encoded bytes). ``class_names``: the real set's, in label
    order, for the ClassLabel; else the records' optional ``class_names`` (the producer's), else none."""
    if class_names is None and records:
        class_names = records[0].get("class_names")
    dim = len(records[0]["features"]) if records and records[0].get("features") is not None else None
    rows = []
    for r in records:
        row = {k: r[k] for k in PARQUET_SCHEMA.names}
        row["image"] = {"bytes": r["image"], "path": f"{r['key']}.{image_extension(r['image'])}"}
        if dim:
            row["features"] = r["features"]
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=parquet_schema(class_names, dim))
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


def encode_webdataset(records: list[dict], class_names: list[str] | None = None) -> bytes:
    """A WebDataset tar: per sample ``{key}.png`` (``.jpg``, ``.webp``: the image's codec), ``{key}.cls`` and
    ``{key}.json``, in record order. ``class_names`` is accepted for symmetry with :func:`encode_parquet`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for r in records:
            meta = {"key": r["key"], "label": r["label"], "class_name": r["class_name"], "seed": r["seed"]}
            for ext, data in (
                (image_extension(r["image"]), r["image"]),
                ("cls", str(r["label"]).encode()),
                ("json", json.dumps(meta, sort_keys=True).encode()),
            ):
                info = tarfile.TarInfo(f"{r['key']}.{ext}")
                info.size, info.mtime, info.mode = len(data), WDS_MTIME, 0o444
                info.uname = info.gname = "factory"
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


ENCODERS = {"parquet": encode_parquet, "webdataset": encode_webdataset}


class ShardSink:
    """Writes and finds the shards of one run under ``output`` (a local path or an fsspec URI)."""

    def __init__(self, output: str, formats: list[str], storage_options: dict | None = None,
                 class_names: list[str] | None = None):
        self.output = output.rstrip("/")
        self.formats = list(formats)
        self.class_names = None if class_names is None else list(class_names)  # for the Parquet ClassLabel
        self.fs, self.root = fsspec.core.url_to_fs(self.output, **(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.retries = 6

    def path(self, recipe: str, kind: str, name: str) -> str:
        if kind == "_stats":
            return f"{self.root}/{recipe}/_stats/{name}.json"
        return f"{self.root}/{recipe}/{kind}/{name}{SUFFIX[kind]}"

    def url(self, recipe: str, kind: str, name: str) -> str:
        return self.fs.unstrip_protocol(self.path(recipe, kind, name))

    def _retry(self, what: str, fn, *args):
        """Object stores fail transiently (throttling, a restarting endpoint): retry with backoff."""
        for attempt in range(self.retries + 1):
            try:
                return fn(*args)
            except FileNotFoundError:
                raise
            except Exception as e:  # the backends raise many types for the same transient failure
                if self.local or attempt == self.retries:
                    raise OSError(f"{what} failed after {attempt + 1} attempts: {e}") from e
                time.sleep(min(8.0, 0.25 * 2**attempt))

    def is_complete(self, recipe: str, name: str) -> bool:
        path = self.path(recipe, "_stats", name)
        return self._retry(f"checking {path}", lambda: self.fs.exists(path))

    def completed(self, recipe: str) -> set[str]:
        """Names of the recipe's completed shards, from one listing of its stats folder."""
        folder = f"{self.root}/{recipe}/_stats"
        try:
            if self.local:
                entries = os.listdir(folder)
            else:
                entries = self._retry(f"listing {folder}", lambda: self.fs.ls(folder, detail=False, refresh=True))
        except FileNotFoundError:
            return set()
        names = (e.rsplit("/", 1)[-1] for e in entries)
        return {n[: -len(".json")] for n in names if n.endswith(".json")}

    def read_stats(self, recipe: str, name: str) -> dict:
        return json.loads(self.fs.cat_file(self.path(recipe, "_stats", name)))

    def put(self, path: str, data: bytes) -> None:
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self._retry(f"writing {self.fs.unstrip_protocol(path)}", self.fs.pipe_file, path, data)

    def commit(self, recipe: str, name: str, records: list[dict], stats: dict) -> dict:
        """Write every format of one shard, then its stats file; returns the stats written."""
        files = {}
        for kind in self.formats:
            data = ENCODERS[kind](records, self.class_names)
            self.put(self.path(recipe, kind, name), data)
            files[kind] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        stats = {**stats, "recipe": recipe, "shard": name, "num_images": len(records), "files": files}
        self.put(self.path(recipe, "_stats", name), json.dumps(stats, sort_keys=True, indent=1).encode())
        return stats

    def check_writable(self) -> None:
        """Fail early, with the URI in the message, when the output cannot be written."""
        probe = f"{self.root}/_factory_write_probe-{uuid.uuid4().hex}"
        try:
            if self.local:
                os.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as e:  # any backend error means the same thing to the user
            raise OSError(f"output {self.output} is not writable: {e}") from None

    def shard_files(self, recipe: str, kind: str) -> list[str]:
        return sorted(self.fs.glob(f"{self.root}/{recipe}/{kind}/*{SUFFIX[kind]}"))
