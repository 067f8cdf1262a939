"""The reference bank: the real train and test splits embedded once, class by class, in the run's feature space.

    <output>/_references/train/c00003.npy    float32 (N_c, D): class 3's train features
    <output>/_references/train/c00003.json   written after it: count, per-dimension sum and sum of squares
    <output>/_references/test/...            the same for the test split
    <output>/_references/meta.json           written last: the bank is complete

Sampling actors load only the classes they make, scoring reads the test features class by class, and
nothing re-embeds the real set after this stage. A rerun skips every class whose .json exists; a bank
made for other data or another feature space is refused, not silently reused.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

BANK = "_references"
SPLITS = ("train", "test")


@dataclass
class RealInfo:
    """What the plan, the backbone and the checks need of a real set: no images."""

    class_names: list[str]
    size: tuple[int, int]
    mode: str
    counts: dict  # split -> list of images per class (label order)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train_size(self) -> int:
        return int(sum(self.counts["train"]))


def real_info(cfg) -> RealInfo:
    """The real set's names, size, mode and counts: from a prepared set's class index when it has one (metadata
    only, whatever the set's size), else from loading the split (the small embedded and folder sets)."""
    from factory.data import load_real, read_class_index

    if cfg.data.source == "parquet" and cfg.data.root:
        index = read_class_index(cfg.data.root)
        if index is not None and all(s in index.get("counts", {}) for s in SPLITS):
            n = len(index["class_names"])
            counts = {s: _count_list(index["counts"][s], index["class_names"], n) for s in SPLITS}
            size = index["size"]
            return RealInfo(list(index["class_names"]), (int(size[0]), int(size[1])) if isinstance(size, list)
                            else (int(size), int(size)), index["mode"], counts)
    counts, first = {}, None
    for split in SPLITS:
        real = load_real(cfg.data.source, split, cfg.data.root)
        first = first or real
        counts[split] = np.bincount(real.labels, minlength=real.num_classes).tolist()
    return RealInfo(list(first.class_names), first.size, first.mode, counts)


def _count_list(counts, names, n) -> list[int]:
    if isinstance(counts, dict):  # by class name or by label
        return [int(counts.get(name, counts.get(str(i), 0))) for i, name in enumerate(names)]
    return [int(c) for c in counts] + [0] * (n - len(counts))


class ClassImages:
    """The real images of one class of a split. Parquet sets are read with a filter on the label column, so
    memory holds one class; the other sources load their split once (per process) and slice it."""

    def __init__(self, source: str, root: str | None):
        self.source, self.root = source, root

    def __call__(self, split: str, label: int) -> np.ndarray:
        if self.source == "parquet":
            return _parquet_class(self.root, split, label)
        return _whole_split(self.source, self.root, split).of_class(label)


@lru_cache(maxsize=2)
def _whole_split(source, root, split):
    from factory.data import load_real

    return load_real(source, split, root)


@lru_cache(maxsize=4)
def _label_index(root: str, split: str) -> tuple:
    """(fs, [(file, row group, min label, max label)]) from the Parquet footers' statistics, read once per
    process: a class then reads only the row groups that can hold it, not every file of the split."""
    import pyarrow.parquet as pq

    from factory.data import _shard_files

    fs, files = _shard_files(root, ".parquet", split)
    groups = []
    for f in files:
        with fs.open(f, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
        col = next((i for i in range(meta.num_columns) if meta.schema.column(i).path == "label"), -1)
        for rg in range(meta.num_row_groups):
            st = meta.row_group(rg).column(col).statistics if col >= 0 else None
            lo, hi = (st.min, st.max) if st is not None and st.has_min_max else (None, None)
            groups.append((f, rg, lo, hi))
    return fs, groups


def _parquet_class(root: str, split: str, label: int) -> np.ndarray:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from factory.data import _from_records, read_class_index

    fs, groups = _label_index(root, split)
    records = []
    for f, rg, lo, hi in groups:
        if lo is not None and not lo <= label <= hi:
            continue
        with fs.open(f, "rb") as fh:
            table = pq.ParquetFile(fh).read_row_group(rg, columns=["key", "image", "label", "class_name"])
        table = table.filter(pc.equal(table.column("label"), label))
        records += [(img, int(lab), name, f"{f}:{key}") for key, img, lab, name in
                    zip(*(table.column(c).to_pylist() for c in ("key", "image", "label", "class_name")))]
    if not records:
        return np.zeros((0,), dtype=np.uint8)
    index = read_class_index(root)
    return _from_records(records, root, index["class_names"] if index else None).images


def as_float(images: np.ndarray):
    """uint8 (N, H, W) or (N, H, W, 3) -> float32 (N, C, H, W) in [-1, 1], as the sampler's pixels."""
    import torch

    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
    return x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)


class ClassEmbedder:
    """Ray Data callable class: loads the feature model once, then embeds and writes one (split, class) a row."""

    def __init__(self, config: dict, output: str, storage_options: dict | None = None):
        import torch

        from factory.config import from_dict
        from factory.generate import build_features
        from factory.shards import ShardSink

        self.cfg = from_dict(config)
        torch.set_num_threads(self.cfg.executor.torch_threads)
        self.features = build_features(self.cfg)
        self.images = ClassImages(self.cfg.data.source, self.cfg.data.root)
        self.bank = ReferenceBank(output, storage_options)
        self.sink = ShardSink(output, [], storage_options)

    def __call__(self, batch: dict) -> dict:
        from factory.generate import embed

        rows = {"split": [], "label": [], "count": []}
        for split, label in zip(batch["split"], batch["label"]):
            split, label = str(split), int(label)
            images = self.images(split, label)
            if len(images):
                feats = embed(self.features, as_float(images)).float().cpu().numpy()
            else:
                feats = np.zeros((0, 0), dtype=np.float32)
            buf = io.BytesIO()
            np.save(buf, feats.astype(np.float32), allow_pickle=False)
            self.sink.put(self.bank.path(split, label, ".npy"), buf.getvalue())
            f64 = feats.astype(np.float64)
            stats = {"count": int(len(feats)), "sum": f64.sum(0).tolist(), "sumsq": (f64 ** 2).sum(0).tolist()}
            self.sink.put(self.bank.path(split, label, ".json"), json.dumps(stats).encode())  # marker, last
            rows["split"].append(split)
            rows["label"].append(label)
            rows["count"].append(len(feats))
        return {k: np.asarray(v) for k, v in rows.items()}


class ReferenceBank:
    """Reads (and names the files of) the bank under a run's output."""

    def __init__(self, output: str, storage_options: dict | None = None):
        import fsspec

        self.output = output.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.output, **(storage_options or {}))
        self.root = f"{root}/{BANK}"
        self._meta = None

    def path(self, split: str, label: int, suffix: str) -> str:
        return f"{self.root}/{split}/c{label:05d}{suffix}"

    @property
    def meta_path(self) -> str:
        return f"{self.root}/meta.json"

    def is_complete(self) -> bool:
        return self.fs.exists(self.meta_path)

    def meta(self) -> dict:
        if self._meta is None:
            self._meta = json.loads(self.fs.cat_file(self.meta_path))
        return self._meta

    def done(self, split: str) -> set[int]:
        try:
            names = self.fs.ls(f"{self.root}/{split}", detail=False)
        except FileNotFoundError:
            return set()
        return {int(n.rsplit("/", 1)[-1][1:6]) for n in names if n.endswith(".json")}

    def features(self, split: str, label: int):
        """float32 tensor (N_c, D) of one class."""
        import torch

        return torch.from_numpy(np.load(io.BytesIO(self.fs.cat_file(self.path(split, label, ".npy")))))

    def stats(self, split: str, label: int) -> dict:
        return json.loads(self.fs.cat_file(self.path(split, label, ".json")))

    def info(self) -> RealInfo:
        m = self.meta()
        return RealInfo(m["class_names"], tuple(m["size"]), m["mode"], m["counts"])


def bank_signature(cfg) -> dict:
    """What the bank's content depends on: the real data and the feature space."""
    import dataclasses

    return {"data": {"source": cfg.data.source, "root": cfg.data.root}, "features": dataclasses.asdict(cfg.features)}


def build_reference_bank(cfg, output: str, info: RealInfo, labels: list[int], storage_options: dict | None = None,
                         progress: bool = True) -> dict:
    """The references stage: embed ``labels``' train and test images once, one (split, class) per actor call.

    Returns the bank's meta.json content. The driver holds one small row per class and the per-dimension
    sums it needs for ``feature_var`` (the ridge scale of the class Gaussians), nothing that grows with images.
    """
    import ray
    from tqdm import tqdm

    from factory.shards import ShardSink

    bank = ReferenceBank(output, storage_options)
    signature = bank_signature(cfg)
    if bank.is_complete():
        meta = bank.meta()
        if meta.get("signature") != json.loads(json.dumps(signature)):
            raise ValueError(f"{output}/{BANK} was made for {meta.get('signature')}, not this run's data and features "
                             f"({signature}): use another --output, or delete {BANK}/ to rebuild it")
        if set(labels) <= set(meta["labels"]):
            return meta
    done = {split: bank.done(split) for split in SPLITS}
    items = [{"split": s, "label": int(c)} for s in SPLITS for c in labels
             if c not in done[s] and info.counts[s][c] > 0]
    if items:
        ex = cfg.executor
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 200)).map_batches(
            ClassEmbedder, fn_constructor_kwargs=dict(config=cfg.to_dict(), output=output,
                                                      storage_options=storage_options),
            batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, ex.num_actors[1])),
            num_cpus=ex.num_cpus, num_gpus=ex.num_gpus)
        with tqdm(total=len(items), desc="references", unit="class", disable=not progress) as bar:
            for _ in ds.iter_rows():
                bar.update(1)
    # the ridge scale of every class Gaussian: the mean per-dimension variance of all train features
    n, s1, s2 = 0, None, None
    for c in labels:
        if info.counts["train"][c] == 0:
            continue
        st = bank.stats("train", c)
        if not st["count"]:
            continue
        n += st["count"]
        a, b = np.asarray(st["sum"]), np.asarray(st["sumsq"])
        s1, s2 = (a, b) if s1 is None else (s1 + a, s2 + b)
    dim = 0 if s1 is None else int(len(s1))
    var = float(((s2 - s1 ** 2 / n) / max(n - 1, 1)).mean()) if n > 1 else 0.0
    meta = {"signature": signature, "class_names": info.class_names, "size": list(info.size), "mode": info.mode,
            "counts": info.counts, "labels": sorted(set(labels)), "dim": dim, "feature_var": var,
            "train_images": n}
    ShardSink(output, [], storage_options).put(bank.meta_path, json.dumps(meta, indent=1).encode())
    return meta
