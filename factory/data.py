"""Real image sets: the targets a synthetic set is matched to, and the test data it is judged on.

Every source returns a `RealSet`: uint8 images (N, H, W) for mode "L" or (N, H, W, 3) for "RGB",
int64 labels, and the class names indexed by label. Splits are fixed:

- ``digits``: scikit-learn's embedded 8x8 digits, split by
  ``train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)`` (kept in ``~/.cache/factory``).
- ``fashion_mnist``: Debian's ``dataset-fashion-mnist`` files (its own 60k/10k split).
- ``imagefolder``: ``root/<split>/<class_name>/*.png|jpg`` (or ``root/<class_name>/...`` when the
  root has no split folders), local or on object storage through fsspec.
- ``parquet`` / ``webdataset``: shards in the factory's own layout (``image``: PNG, JPEG or WebP, as the
  ``datasets`` Image struct or plain bytes, + ``label`` + ``class_name``), local or remote, as written by
  ``factory run`` or any compatible tool.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from functools import lru_cache

import fsspec
import numpy as np
from PIL import Image

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CLASS_INDEX = "classes.json"  # a Parquet set's class index, when it has one (see read_class_index)


class DataError(ValueError):
    """A real data source is missing, unreadable or inconsistent."""


@dataclass
class RealSet:
    images: np.ndarray  # uint8, (N, H, W) for "L", (N, H, W, 3) for "RGB"
    labels: np.ndarray  # int64, (N,)
    class_names: list[str]
    mode: str  # "L" or "RGB"

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def of_class(self, label: int) -> np.ndarray:
        return self.images[self.labels == label]

    def to_float(self) -> "np.ndarray":
        """Images as float32 in [-1, 1], channels first: (N, C, H, W)."""
        return to_pixels(self.images).numpy()


# --- the one conversion between stored images and the sampler's pixels (torch imported when used) ----------


def to_pixels(images):
    """uint8 (N, H, W) or (N, H, W, 3), numpy or torch -> float32 torch (N, C, H, W) in [-1, 1]."""
    import torch

    x = (torch.from_numpy(images) if isinstance(images, np.ndarray) else images).float() / 127.5 - 1.0
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def _levels(pixels):
    """Pixels in [-1, 1] -> the 0..255 levels a stored uint8 image holds (still float, where the pixels are)."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round()


def quantise(pixels):
    """Pixels in [-1, 1] rounded to the 256 levels a stored uint8 image holds, still float in [-1, 1]."""
    return _levels(pixels) / 127.5 - 1.0


def to_uint8(pixels) -> np.ndarray:
    """Pixels in [-1, 1], (B, C, H, W) -> uint8 (B, H, W) for one channel, (B, H, W, 3) for three.

    Quantised where the pixels are (the GPU): only uint8 crosses to the host."""
    import torch

    x = _levels(pixels).to(torch.uint8).cpu().numpy()
    return x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)


def load_real(source: str, split: str, root: str | None = None) -> RealSet:
    """Load the ``split`` ("train" or "test") of a real set by source name."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if source == "digits":
        return _digits(split)
    if source == "fashion_mnist":
        return _fashion_mnist(split, root or FASHION_MNIST_DIR)
    if source in ("imagefolder", "parquet", "webdataset"):
        if not root:
            raise DataError(f"data source {source!r} needs a root (a folder or URI)")
        reader = {"imagefolder": _imagefolder, "parquet": _parquet, "webdataset": _webdataset}[source]
        return reader(root, split)
    raise DataError(
        f"unknown data source {source!r}; expected one of digits, fashion_mnist, imagefolder, parquet, webdataset"
    )


def _digits(split: str) -> RealSet:
    images, labels, names = _digits_split(split)
    return RealSet(images, labels, names, "L")


def digits_cache_dir() -> str:
    """Where the digits split is kept: ``$FACTORY_CACHE``, else ``$XDG_CACHE_HOME/factory`` (~/.cache/factory)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("FACTORY_CACHE") or os.path.join(base, "factory")


@lru_cache(maxsize=2)
def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's digits split, kept as .npz (keyed by scikit-learn's version) once made: importing
    sklearn.datasets and sklearn.model_selection costs ~2 s, paid by every process that reads the quickstart's
    set (the driver, the embedding actors, the classifiers' workers) and by every CLI call."""
    from importlib.metadata import version

    path = os.path.join(digits_cache_dir(), f"digits-sklearn-{version('scikit-learn')}-{split}.npz")
    try:
        with np.load(path) as z:
            return z["images"], z["labels"], [str(n) for n in z["names"]]
    except (OSError, KeyError, ValueError):  # not made yet, or unreadable: made again
        pass
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        d.data, d.target, test_size=0.25, stratify=d.target, random_state=0
    )
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    images = np.round(x.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    labels, names = y.astype(np.int64), [str(c) for c in d.target_names]
    try:  # written whole, then renamed: a reader never sees half a file
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, names=np.asarray(names))
        os.replace(tmp, path)
    except OSError:  # a read-only home: the set still loads, from scikit-learn each time
        pass
    return images, labels, names


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist(split: str, root: str) -> RealSet:
    prefix = "train" if split == "train" else "t10k"
    img_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    lbl_path = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
    if not (os.path.exists(img_path) and os.path.exists(lbl_path)):
        raise DataError(
            f"Fashion-MNIST files not found under {root}: install Debian's package "
            "'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist)"
        )
    images = _read_idx(img_path).copy()
    labels = _read_idx(lbl_path).astype(np.int64)
    return RealSet(images, labels, list(FASHION_MNIST_CLASSES), "L")


def image_bytes(value) -> bytes:
    """The encoded bytes of one ``image`` value of a Parquet set: the ``datasets`` Image struct
    ``{bytes, path}`` (what the factory writes) or plain binary (older shards, other tools)."""
    if isinstance(value, dict):
        if value.get("bytes") is None:
            raise DataError(f"image value without bytes (path {value.get('path')!r}): only embedded images are read")
        return value["bytes"]
    return value


def decode_image(data, what: str) -> Image.Image:
    """Decode image bytes (or an Image struct, see :func:`image_bytes`), naming ``what`` in the error when
    they are not a readable image."""
    data = image_bytes(data)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except Exception as e:  # PIL raises several types for corrupt data
        raise DataError(f"corrupt or unreadable image: {what} ({e})") from None


def _stack(imgs: list[Image.Image], names: list[str], root: str) -> tuple[np.ndarray, str]:
    if not imgs:
        raise DataError(f"no images found under {root}")
    mode = "L" if all(im.mode in ("L", "1", "I;16") for im in imgs) else "RGB"
    size = imgs[0].size
    arrays = []
    for im, name in zip(imgs, names):
        if im.size != size:
            raise DataError(f"image {name} is {im.size[0]}x{im.size[1]}, expected {size[0]}x{size[1]} like the rest")
        arrays.append(np.asarray(im.convert(mode), dtype=np.uint8))
    return np.stack(arrays), mode


def _imagefolder(root: str, split: str) -> RealSet:
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        raise DataError(f"image folder not found: {root}")
    if fs.isdir(f"{path}/{split}"):
        path = f"{path}/{split}"
    class_dirs = sorted(p for p in fs.ls(path, detail=False) if fs.isdir(p))
    if not class_dirs:
        raise DataError(f"image folder {root} has no class sub-folders")
    class_names = [p.rstrip("/").rsplit("/", 1)[-1] for p in class_dirs]
    imgs, names, labels = [], [], []
    for label, d in enumerate(class_dirs):
        for f in sorted(fs.ls(d, detail=False)):
            if f.lower().endswith(IMAGE_SUFFIXES):
                imgs.append(decode_image(fs.cat_file(f), f))
                names.append(f)
                labels.append(label)
    images, mode = _stack(imgs, names, root)
    return RealSet(images, np.asarray(labels, dtype=np.int64), class_names, mode)


def shard_files(root: str, suffix: str, split: str | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """(filesystem, sorted paths) of the ``suffix`` files under ``root`` (a file, or a folder searched
    recursively; its ``split`` subfolder when there is one); a clear error when there are none."""
    fs, path = fsspec.core.url_to_fs(root)
    if split is not None and fs.isdir(f"{path}/{split}"):
        path = f"{path}/{split}"
    if fs.isfile(path):
        return fs, [path]
    files = sorted(fs.glob(f"{path.rstrip('/')}/**/*{suffix}"))
    if not files:
        raise DataError(f"no {suffix} files found under {root}")
    return fs, files


def has_own_split(source: str, root: str | None, split: str) -> bool:
    """Whether the set has a ``split`` of its own. An image folder, Parquet or WebDataset root without a
    ``<split>/`` folder reads as the same images for every split, so its "test" split is the train images."""
    if source not in ("imagefolder", "parquet", "webdataset") or not root:
        return True
    fs, path = fsspec.core.url_to_fs(root)
    return fs.isdir(f"{path.rstrip('/')}/{split}")


def read_class_index(root: str) -> dict | None:
    """``<root>/classes.json`` (written by ``factory prepare``: ``class_names`` in label order, size, mode,
    counts per split), or None when the set has none."""
    fs, path = fsspec.core.url_to_fs(root)
    f = f"{path.rstrip('/')}/{CLASS_INDEX}"
    return json.loads(fs.cat_file(f)) if fs.isfile(f) else None


def _from_records(records: list[tuple[bytes, int, str, str]], root: str,
                  class_names: list[str] | None = None) -> RealSet:
    names_by_label: dict[int, str] = {}
    imgs, names, labels = [], [], []
    for data, label, cname, what in records:
        imgs.append(decode_image(data, what))
        names.append(what)
        labels.append(label)
        names_by_label.setdefault(label, cname)
    images, mode = _stack(imgs, names, root)
    if class_names is not None:  # the class index names every class, those without images in this split too
        bad = sorted(i for i, c in names_by_label.items() if i >= len(class_names) or class_names[i] != c)
        if bad:
            raise DataError(f"{root}: label {bad[0]} ({names_by_label[bad[0]]!r}) disagrees with {CLASS_INDEX}")
        return RealSet(images, np.asarray(labels, dtype=np.int64), list(class_names), mode)
    n = max(names_by_label) + 1
    class_names = [names_by_label.get(i, str(i)) for i in range(n)]
    return RealSet(images, np.asarray(labels, dtype=np.int64), class_names, mode)


def _parquet(root: str, split: str) -> RealSet:
    import pyarrow.parquet as pq

    index = read_class_index(root)
    if index is not None:  # a `factory prepare` output: its splits are strict (no fallback to the root)
        fs, path = fsspec.core.url_to_fs(root)
        if not fs.isdir(f"{path.rstrip('/')}/{split}"):
            raise DataError(f"{root} has no {split} split (see its {CLASS_INDEX}; factory prepare --test-fraction)")
    fs, files = shard_files(root, ".parquet", split)
    records = []
    for f in files:
        table = pq.read_table(f, filesystem=fs, columns=["key", "image", "label", "class_name"])
        for key, img, label, cname in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            records.append((img, int(label), cname, f"{f}:{key}"))
    return _from_records(records, root, index["class_names"] if index else None)


def wds_samples(fs, path: str):
    """(key, {ext: bytes}) of a WebDataset tar, streamed by webdataset's own tar reader and grouping (a sample's
    members are consecutive; hidden and ``__meta__`` files skipped, extensions lower-cased)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with fs.open(path, "rb") as fh:
        members = ({**m, "__url__": path} for m in tar_file_iterator(fh))
        for sample in group_by_keys(members):
            yield sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}


def _webdataset(root: str, split: str) -> RealSet:
    fs, files = shard_files(root, ".tar", split)
    records = []
    for f in files:
        for key, s in wds_samples(fs, f):
            img = next((s[e] for e in ("png", "jpg", "jpeg", "webp") if e in s), None)
            if img is None or "cls" not in s:
                raise DataError(f"webdataset sample {f}:{key} lacks an image or a .cls label")
            meta = json.loads(s["json"]) if "json" in s else {}
            label = int(s["cls"].decode().strip())
            records.append((img, label, meta.get("class_name", str(label)), f"{f}:{key}"))
    return _from_records(records, root)
