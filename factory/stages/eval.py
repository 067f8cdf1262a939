"""``factory eval``: an outside image set (our shards, Parquet, WebDataset, an image folder) scored like a run's.

The set streams through a Ray Data actor pool that decodes, checks and embeds it (the feature model is built in
the actor) and writes each batch's features per class in the shard layout the score stage reads
(``<work>/set/parquet/c00003-s<id>.parquet``); the real set's features are a reference bank under ``<work>``
(built once, reused by later evals of the same real set and feature space). Then the run's score code scores
it, so the numbers are the run's for the same images. The driver holds per-class counts, never an image or a
feature.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from factory.data import IMAGE_SUFFIXES, DataError

SET = "set"  # the scored set's name: its features are <work>/set/parquet/


def default_work(real: str, real_root: str | None, features: str, checkpoint: str) -> str:
    """A cache folder per real set and feature space, so its bank is embedded once."""
    key = repr((real, os.path.abspath(real_root) if real_root and "://" not in real_root else real_root,
                features, checkpoint))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "factory", "eval", hashlib.sha256(key.encode()).hexdigest()[:16])


def _records(source: str, table) -> tuple[list[str], list, list[str]]:
    """(keys, encoded images, class names) of a batch of any source's rows."""
    import json

    from factory.data import image_bytes

    cols = table.column_names
    rows = table.to_pydict()
    if source == "parquet":
        return [str(k) for k in rows["key"]], [image_bytes(v) for v in rows["image"]], list(rows["class_name"])
    if source == "imagefolder":
        return list(rows["path"]), list(rows["bytes"]), [p.replace("\\", "/").rsplit("/", 2)[-2] for p in rows["path"]]
    keys, images, names = [], [], []
    for i, key in enumerate(rows["__key__"]):
        img = next((rows[e][i] for e in ("png", "jpg", "jpeg", "webp") if e in cols and rows[e][i] is not None), None)
        cls = rows["cls"][i] if "cls" in cols else None
        if img is None or cls is None:
            raise DataError(f"webdataset sample {key} lacks an image or a .cls label")
        meta = json.loads(rows["json"][i]) if "json" in cols and rows["json"][i] is not None else {}
        keys.append(str(key))
        images.append(img)
        names.append(meta.get("class_name", str(int(bytes(cls).decode().strip()))))
    return keys, images, names


class SetEmbedder:
    """Ray Data callable class: decode and check a batch, embed it, write its features per class; returns the
    batch's count per class."""

    def __init__(self, config: dict, source: str, root: str, real: dict, out: str):
        import torch

        from factory.config import from_dict
        from factory.generate import build_features
        from factory.shards import ShardSink

        cfg = from_dict(config)
        torch.set_num_threads(cfg.executor.torch_threads)
        self.features = build_features(cfg)
        self.source, self.root, self.real, self.out = source, root, real, out.rstrip("/")
        self.labels = {name: i for i, name in enumerate(real["class_names"])}
        self.sink = ShardSink(self.out, [])

    def _array(self, data, key: str) -> np.ndarray:
        from factory.data import decode_image

        img = decode_image(data, key)
        h, w = self.real["size"]
        if img.size != (w, h):
            raise DataError(f"{self.root}: image {key} is {img.size[0]}x{img.size[1]}, the real set's are {w}x{h}")
        return np.asarray(img.convert(self.real["mode"]), dtype=np.uint8)  # e.g. WebP, which has no grey mode

    def __call__(self, table) -> dict:
        try:
            return self._embed(table)
        except DataError as e:  # bad input: its message reaches the driver as a row (Ray Data's errors drop it)
            return {"label": np.zeros(1, np.int64), "count": np.zeros(1, np.int64), "error": np.asarray([str(e)])}

    def _embed(self, table) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from factory.bank import as_float
        from factory.generate import embed

        keys, images, names = _records(self.source, table)
        unknown = sorted(set(names) - set(self.labels))
        if unknown:
            raise DataError(f"{self.root}: classes {unknown} are not classes of {self.real['source']!r}")
        labels = np.asarray([self.labels[n] for n in names], dtype=np.int64)
        feats = embed(self.features, as_float(np.stack([self._array(d, k) for d, k in zip(images, keys)])))
        feats = feats.float().cpu().numpy()
        out = {"label": [], "count": []}
        for label in np.unique(labels):
            rows = sorted(np.flatnonzero(labels == label), key=lambda i: keys[i])  # same set, same file bytes
            f = feats[rows]
            table = pa.table({"key": [keys[i] for i in rows], "label": labels[rows],
                              "features": pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1)), f.shape[1])})
            name = hashlib.sha256(keys[rows[0]].encode()).hexdigest()[:16]
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf)
            self.sink.put(f"{self.sink.root}/{SET}/parquet/c{int(label):05d}-s{name}.parquet", buf.getvalue().to_pybytes())
            out["label"].append(int(label))
            out["count"].append(len(rows))
        return {"label": np.asarray(out["label"], dtype=np.int64), "count": np.asarray(out["count"], dtype=np.int64),
                "error": np.asarray([""] * len(out["label"]))}


def read_set(source: str, root: str):
    """The set's rows as a lazy Ray Dataset, in its own reader (the train split where it has splits)."""
    import fsspec
    import pyarrow.fs as pafs
    import ray

    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        raise DataError(f"{source} set not found: {root}")
    if fs.isdir(f"{path}/train"):
        path = f"{path}/train"
    pa_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    if source == "parquet":
        return ray.data.read_parquet(path, filesystem=pa_fs).select_columns(["key", "image", "class_name"])
    if source == "webdataset":
        return ray.data.read_webdataset(path, filesystem=pa_fs, decoder=None, file_extensions=["tar"])
    if source == "imagefolder":
        return ray.data.read_binary_files(path, filesystem=pa_fs, include_paths=True,
                                          file_extensions=[s.lstrip(".") for s in IMAGE_SUFFIXES])
    raise DataError(f"unknown set format {source!r}; expected parquet, webdataset or imagefolder")


def evaluate_dataset(source: str, root: str, real_source: str, real_root: str | None = None,
                     features_name: str = "cnn", features_checkpoint: str = "digits", k: int = 5,
                     work: str | None = None, progress: bool = False) -> dict:
    """Score an image set against a real set's test split (class ids matched by class name); the metrics of
    a run's set, with ``num_images``. ``work``: where the real set's bank and the set's features go."""
    import ray

    from factory.config import from_dict
    from factory.dataplane import ensure_ray
    from factory.shards import ShardSink
    from factory.stages.references import build_reference_bank, real_info
    from factory.stages.score import score_sets

    work = work or default_work(real_source, real_root, features_name, features_checkpoint)
    # Ray's workers do not share the driver's working directory
    work, root = (p if "://" in p else os.path.abspath(p) for p in (work, root))
    if real_root and "://" not in real_root:
        real_root = os.path.abspath(real_root)
    cfg = from_dict({"name": "eval", "data": {"source": real_source, "root": real_root},  # plain: nothing fitted
                     "features": {"name": features_name, "checkpoint": features_checkpoint}, "eval": {"k": k}})
    info = real_info(cfg)  # the real set's classes, size and mode
    ensure_ray(None)
    ds = read_set(source, root)  # fails on a missing set before anything is written
    sink = ShardSink(work, [])
    sink.check_writable()
    if sink.fs.exists(f"{sink.root}/{SET}"):
        sink.fs.rm(f"{sink.root}/{SET}", recursive=True)  # the last eval's set
    real = {"source": real_source, "class_names": info.class_names, "size": list(info.size), "mode": info.mode}
    ex = cfg.executor
    counts: dict[int, int] = {}
    for batch in ds.map_batches(SetEmbedder, batch_format="pyarrow", batch_size=256,
                                fn_constructor_kwargs=dict(config=cfg.to_dict(), source=source, root=root,
                                                           real=real, out=work),
                                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, ex.num_actors[1])),
                                num_cpus=ex.num_cpus, num_gpus=ex.num_gpus).iter_batches(batch_format="numpy"):
        for label, n, error in zip(batch["label"], batch["count"], batch["error"]):
            if error:
                raise DataError(str(error))
            counts[int(label)] = counts.get(int(label), 0) + int(n)
    if not counts:
        raise DataError(f"no images found under {root}")
    labels = sorted(counts)
    build_reference_bank(cfg, work, info, [c for c in range(info.num_classes) if info.counts["train"][c]],
                         progress=progress)
    if missing := [info.class_names[c] for c in labels if not info.counts["test"][c]]:
        raise DataError(f"{real_source!r} has no test images of the classes {missing}: they cannot be scored")
    out = score_sets(cfg, work, {SET: sum(counts.values())}, labels, info.class_names, progress=progress)[SET]
    return out
