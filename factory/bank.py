"""The reference bank's reader: what the references stage wrote, read one class at a time.

    <output>/_references/train/c00003.npy            float32 (N_c, D): class 3's train features
    <output>/_references/train/c00003.gauss.npz      its Gaussian: mean (D,) and unbiased covariance (D, D), float64
    <output>/_references/train/c00003.json           written after them: count, per-dimension sum and sum of squares
    <output>/_references/train/means.npz             labels (C,) and class means (C, D): the low-density energy's table
    <output>/_references/test/...                    the test split's features and stats
    <output>/_references/ot/<recipe>/K10/c00003.npz  DMGD's K-means support, masses and cost scale for that recipe
    <output>/_references/chamfer/<recipe>/k32/c00003.npz   Chamfer's k reference features for that recipe
    <output>/_references/lowdensity/<recipe>/        the recipe's real-vs-synthetic discriminator, done.json last
    <output>/_references/meta.json                   written after the per-class files: the bank is complete

This module only names and reads those files, and holds the few pure functions whose results they store
(so a producer without a bank computes the same things in memory). The writing is
:mod:`factory.stages.references`'. Also here: the real set read one class at a time (``ClassImages``) and
its metadata (``real_info``), which the producer and the stage both need.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from factory.data import quantise, to_pixels

BANK = "_references"
SPLITS = ("train", "test")
DISC_MAX_CLASSES = 100  # a discriminator sees at most this many classes (a seeded subsample beyond)
DISC_REAL_PER_CLASS = 500  # and at most this many real features of each (a seeded subsample beyond)


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

    from factory.data import shard_files

    fs, files = shard_files(root, ".parquet", split)
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


as_float = to_pixels  # uint8 (N, H, W[, 3]) -> float32 (N, C, H, W) in [-1, 1]: factory.data's one conversion


def features_column(images, features, batch: int = 512) -> np.ndarray:
    """float32 (N, D) features of the images as they are stored (quantised to uint8 and back), so the column
    equals what embedding the decoded shard would give."""
    import torch

    with torch.no_grad():
        q = quantise(images)
        return torch.cat([features(q[i:i + batch]) for i in range(0, len(q), batch)]).float().cpu().numpy()


# --- what the bank stores per class: pure functions of the class's train features ----------------------------


def class_gaussian(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), unbiased covariance (D, D)) in float64; the covariance of a single point is 0. The ridge is
    added by the reader: its scale (meta's ``feature_var``) is known only once every class is in."""
    import torch

    x = torch.as_tensor(np.asarray(feats)).double()
    mean = x.mean(0)
    r = x - mean
    cov = r.T @ r / (len(x) - 1) if len(x) > 1 else torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    return mean.numpy(), cov.numpy()


# the per-class targets the bank holds, and their size key: DMGD's K-means measure, Chamfer's k random
# references, Chamfer's k K-means centres with their masses (``references: kmeans``)
TARGETS = {"ot": "K", "chamfer": "k", "chamfer_kmeans": "k"}


def target_kind(e) -> str:
    """The bank's name for an energy config's per-class target (a key of TARGETS)."""
    if e.name == "chamfer" and e.params.references == "kmeans":
        return "chamfer_kmeans"
    return e.name


def fitted_targets(cfg) -> list[tuple[str, str, int]]:
    """(energy, recipe, size) of every per-class target the config's recipes need: DMGD's K-means (K) and
    Chamfer's references (k). Seeded by recipe and class alone, so one file serves each (recipe, size)."""
    found = {(target_kind(e), name, getattr(e.params, TARGETS[e.name]))
             for name, r in cfg.recipes.items() for e in r.energies if e.name in TARGETS}
    return sorted(found)


def ot_seed(run_seed: int, recipe: str, label: int) -> int:
    from factory.plan import shard_seed

    return shard_seed(run_seed, f"{recipe}/ot", label, 0) % 2**31


def fit_target(energy: str, feats, size: int, run_seed: int, recipe: str, label: int) -> dict:
    """One class's target for a recipe's energy, from its train features: ``support``, ``masses`` and
    ``cost_scale`` of DMGD's K-means measure (K = size), or Chamfer's k = size ``references`` (with their
    ``masses`` for ``chamfer_kmeans``)."""
    from factory import guidance
    from factory.plan import shard_seed

    if energy == "chamfer":
        seed = shard_seed(run_seed, f"{recipe}/chamfer", label, 0)
        return {"references": guidance.select_references(feats, size, seed).numpy()}
    if energy == "chamfer_kmeans":
        seed = shard_seed(run_seed, f"{recipe}/chamfer", label, 0) % 2**31
        support, masses = guidance.kmeans_support(feats, K=size, seed=seed)
        return {"references": support.numpy(), "masses": masses.numpy()}
    support, masses = guidance.kmeans_support(feats, K=size, seed=ot_seed(run_seed, recipe, label))
    return {"support": support.numpy(), "masses": masses.numpy(),
            "cost_scale": np.float64(guidance.cost_scale_from_features(feats))}


def lowdensity_recipes(cfg) -> list[str]:
    """The recipes whose low-density energy has a discriminator term (beta > 0)."""
    return [name for name, r in cfg.recipes.items() for e in r.energies
            if e.name == "lowdensity" and e.params.beta > 0]


def discriminator_classes(labels: list[int], seed: int, recipe: str) -> list[int]:
    """The classes a recipe's discriminator is trained on: all of them up to DISC_MAX_CLASSES, else a seeded
    subsample of that many (sorted), so its memory is bounded whatever the number of classes."""
    from factory.plan import shard_seed

    labels = sorted(labels)
    if len(labels) <= DISC_MAX_CLASSES:
        return labels
    rng = np.random.default_rng(shard_seed(seed, f"{recipe}/disc-classes", 0, 0))
    return sorted(rng.choice(labels, DISC_MAX_CLASSES, replace=False).tolist())


def discriminator_real(feats, seed: int, recipe: str, label: int):
    """At most DISC_REAL_PER_CLASS of one class's train features (a seeded subsample beyond, in row order)."""
    from factory.plan import shard_seed

    if len(feats) <= DISC_REAL_PER_CLASS:
        return feats
    rng = np.random.default_rng(shard_seed(seed, f"{recipe}/disc-real", label, 0))
    return feats[np.sort(rng.choice(len(feats), DISC_REAL_PER_CLASS, replace=False))]


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

    def gauss_path(self, label: int) -> str:
        return self.path("train", label, ".gauss.npz")

    def target_folder(self, energy: str, recipe: str, size: int) -> str:
        return f"{energy}/{recipe}/{TARGETS[energy]}{size}"

    def target_path(self, energy: str, recipe: str, size: int, label: int) -> str:
        return f"{self.root}/{self.target_folder(energy, recipe, size)}/c{label:05d}.npz"

    def discriminator_path(self, recipe: str, name: str = "discriminator.pt") -> str:
        return f"{self.root}/lowdensity/{recipe}/{name}"

    @property
    def means_path(self) -> str:
        return f"{self.root}/train/means.npz"

    @property
    def meta_path(self) -> str:
        return f"{self.root}/meta.json"

    def is_complete(self) -> bool:
        return self.fs.exists(self.meta_path)

    def meta(self) -> dict:
        if self._meta is None:
            self._meta = json.loads(self.fs.cat_file(self.meta_path))
        return self._meta

    def listing(self, folder: str) -> set[str]:
        """File names in ``<bank>/<folder>`` (empty when it does not exist)."""
        try:
            return {n.rsplit("/", 1)[-1] for n in self.fs.ls(f"{self.root}/{folder}", detail=False)}
        except FileNotFoundError:
            return set()

    def done(self, split: str) -> set[int]:
        return {int(n[1:6]) for n in self.listing(split) if n.endswith(".json")}

    def _npz(self, path: str) -> dict:
        with np.load(io.BytesIO(self.fs.cat_file(path)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def features(self, split: str, label: int):
        """float32 tensor (N_c, D) of one class."""
        import torch

        return torch.from_numpy(np.load(io.BytesIO(self.fs.cat_file(self.path(split, label, ".npy")))))

    def stats(self, split: str, label: int) -> dict:
        return json.loads(self.fs.cat_file(self.path(split, label, ".json")))

    def gaussian(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean (D,), covariance (D, D)) of one class's train features, float64, no ridge."""
        z = self._npz(self.gauss_path(label))
        return z["mean"], z["cov"]

    def class_means(self) -> tuple[list[int], np.ndarray]:
        """(labels, means (C, D) float64) of the bank's classes: the one table that grows with classes
        (C x D; 3 MB at 1,000 classes of 768 dimensions)."""
        z = self._npz(self.means_path)
        return z["labels"].tolist(), z["means"]

    def target(self, energy: str, recipe: str, size: int, label: int) -> dict:
        """One class's target for a recipe's energy (:func:`fit_target`)."""
        return self._npz(self.target_path(energy, recipe, size, label))

    def has_discriminator(self, recipe: str) -> bool:
        return self.fs.exists(self.discriminator_path(recipe, "done.json"))

    def discriminator(self, recipe: str):
        """The recipe's fitted :class:`~factory.guidance.FeatureDiscriminator` (eval mode, frozen)."""
        import torch

        from factory.guidance import FeatureDiscriminator

        if not self.has_discriminator(recipe):
            raise FileNotFoundError(f"{self.output}/{BANK}/lowdensity/{recipe}: no discriminator (the references "
                                    "stage trains it before sampling; rerun factory run over this output)")
        done = json.loads(self.fs.cat_file(self.discriminator_path(recipe, "done.json")))
        state = torch.load(io.BytesIO(self.fs.cat_file(self.discriminator_path(recipe))), weights_only=True)
        disc = FeatureDiscriminator(done["in_dim"], tuple(done["hidden"]))
        disc.load_state_dict(state)
        return disc.eval().requires_grad_(False)

    def info(self) -> RealInfo:
        m = self.meta()
        return RealInfo(m["class_names"], tuple(m["size"]), m["mode"], m["counts"])
