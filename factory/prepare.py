"""``factory prepare``: a Ray Data job turning a real image set (class folders, WebDataset tars or Parquet, local
or any fsspec URI) into the factory's Parquet layout, ``data: {source: parquet, root: URI}``.

One *unit* (a class folder of a split, or one input file) is one Ray Data task that reads, decodes, resizes
and writes its files, then its marker; the driver lists folders and files, never images, and reads the
markers at the end. A rerun skips finished units. Inputs, options and the output layout: docs/prepare.md.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import os
import posixpath
import sys
import time

import fsspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from factory.data import DataError, wds_samples

RESIZE_MODES = ("center-crop", "pad", "stretch")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
TEST_DIRS = ("val", "test")
CLASS_INDEX = "classes.json"
REJECTED = "_rejected.jsonl"
PARAMS = "_prepare.json"
SUCCESS = "_SUCCESS"
PARTS = "_parts"
READ_CHUNK = 64  # images fetched at once (fs.cat of a list: concurrent on object stores)


# --------------------------------------------------------------------------------------------- per image


def _hash(seed: int, salt: str, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{salt}/{key}".encode(), digest_size=8).digest(), "big")


def _split_of(key: str, job: dict) -> str:
    """train or test for an image of a source without split folders (a seeded per-image draw)."""
    if job["test_fraction"] <= 0:
        return "train"
    return "test" if _hash(job["seed"], "test", key) < job["test_fraction"] * 2.0**64 else "train"


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):  # 16-bit / float grey -> 8 bits
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "F" and arr.size and arr.max() > 255:
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img if img.mode == mode else img.convert(mode)


def _fit(img: Image.Image, size: int, resize: str) -> Image.Image:
    if img.size == (size, size):
        return img
    method = Image.Resampling.BICUBIC
    if resize == "center-crop":
        return ImageOps.fit(img, (size, size), method)
    if resize == "pad":
        return ImageOps.pad(img, (size, size), method, color=0)
    return img.resize((size, size), method)


def process_image(data: bytes | None, job: dict) -> tuple[bytes | None, str | None]:
    """Encoded bytes -> (PNG of the image at the job's size and mode, None) or (None, why it is rejected)."""
    if data is None:
        return None, "no image in the sample"
    if len(data) == 0:
        return None, "empty file"
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if img.format == "JPEG":  # decode at the smallest DCT scale whose short side is still >= size: faster
            img.draft(None, (job["size"], job["size"]))
        img.load()
        img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        return None, "unreadable: not an image format PIL knows (corrupt?)"
    except Exception as e:  # PIL raises many types for corrupt data (and DecompressionBombError)
        return None, f"unreadable: {type(e).__name__}: {e}"
    if min(w, h) < job["min_size"]:
        return None, f"too small: {w}x{h} (short side under {job['min_size']})"
    try:
        out = _fit(_to_mode(img, job["mode"]), job["size"], job["resize"])
        buf = io.BytesIO()
        out.save(buf, format="PNG")
    except Exception as e:  # a mode PIL cannot convert, a decoder error surfacing late
        return None, f"cannot convert {img.mode} {w}x{h}: {type(e).__name__}: {e}"
    return buf.getvalue(), None


# --------------------------------------------------------------------------------------------- sources


def _label_of(value, name_to_label: dict[str, int]) -> int | None:
    text = value.decode().strip() if isinstance(value, bytes) else str(value).strip()
    try:
        label = int(text)
    except ValueError:
        label = name_to_label.get(text)
    return label if label is not None and label >= 0 else None


def _wds_label(sample: dict, name_to_label: dict) -> tuple[int | None, str | None]:
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            meta = {}
    raw = sample.get("cls", sample.get("cls.txt", meta.get("label") if isinstance(meta, dict) else None))
    label = None if raw is None else _label_of(raw, name_to_label)
    name = meta.get("class_name") if isinstance(meta, dict) else None
    return label, (str(name) if name is not None else None)


def _wds_rows(fs, path: str, job: dict):
    """(key, image bytes or None, label or None, class_name or None) of a WebDataset tar."""
    stem = job["stems"][path]
    for k, sample in wds_samples(fs, path):
        label, name = _wds_label(sample, job["name_to_label"])
        yield f"{stem}/{k}", next((sample[e] for e in WDS_IMAGE_EXTS if e in sample), None), label, name


def _records(fs, unit: dict, job: dict, labels_only: bool = False):
    if unit["kind"] == "webdataset":
        return _wds_rows(fs, unit["path"], job)
    return _parquet_rows(fs, unit["path"], job, labels_only)


def _url(fs, path: str) -> str:
    """A path as the user knows it: plain on a local disk, with its protocol elsewhere."""
    from fsspec.implementations.local import LocalFileSystem

    return path if isinstance(fs, LocalFileSystem) else _url(fs, path)


def _fetch(fs, paths: list[str]) -> dict:
    """{path: bytes or the exception} (one concurrent request batch on object stores)."""
    if any(c in p for p in paths for c in "*?["):  # glob characters: fs.cat would expand them
        out = {}
        for p in paths:
            try:
                out[p] = fs.cat_file(p)
            except Exception as e:  # reported per image
                out[p] = e
        return out
    return fs.cat(paths, on_error="return")


def _hf_class_names(schema, column: str) -> list[str] | None:
    """The names of a ``datasets`` ClassLabel ``column``, from a Parquet schema's metadata."""
    try:
        meta = json.loads((schema.metadata or {})[b"huggingface"])
        feature = meta["info"]["features"][column]
        return [str(n) for n in feature["names"]] if feature.get("_type") == "ClassLabel" else None
    except (KeyError, ValueError, TypeError):
        return None


def _parquet_rows(fs, path: str, job: dict, labels_only: bool = False):
    """(key, image bytes or None, label or None, class_name or None) of a Parquet file, in batches."""
    import pyarrow.parquet as pq

    stem = job["stems"][path]
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        icol, lcol = job["image_column"], job["label_column"]
        if lcol not in names or (not labels_only and icol not in names):
            raise DataError(f"{path}: needs columns {icol!r} and {lcol!r}, has {names}")
        hf_names = _hf_class_names(pf.schema_arrow, lcol)
        cols = [lcol] + [c for c in ("key", "class_name") if c in names] + ([] if labels_only else [icol])
        row = 0
        for batch in pf.iter_batches(batch_size=READ_CHUNK, columns=cols):
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                key = f"{stem}/{data['key'][i] if 'key' in data else row}"
                row += 1
                raw = data[lcol][i]
                label = None if raw is None else _label_of(raw, job["name_to_label"])
                name = data["class_name"][i] if "class_name" in data else None
                if name is None and hf_names is not None and label is not None and label < len(hf_names):
                    name = hf_names[label]
                img = None
                if not labels_only:
                    img = data[icol][i]
                    if isinstance(img, dict):
                        img = img.get("bytes")
                yield key, img, label, name


# --------------------------------------------------------------------------------------------- one unit


class _UnitWriter:
    """Buffers one unit's rows per split and writes a file every ``rows_per_file`` rows."""

    def __init__(self, sink, unit: dict, job: dict):
        self.sink, self.unit, self.job = sink, unit, job
        self.rows: dict[str, list] = {"train": [], "test": []}
        self.files: dict[str, list] = {"train": [], "test": []}
        self.counts: dict[str, dict] = {"train": {}, "test": {}}
        self.names: dict[int, str] = {}
        self.rejected: list[dict] = []

    def add(self, split: str, key: str, png: bytes, label: int, name: str) -> None:
        self.rows[split].append({"key": key, "image": png, "label": label, "class_name": name, "seed": -1})
        self.counts[split][str(label)] = self.counts[split].get(str(label), 0) + 1
        self.names.setdefault(label, name)
        if len(self.rows[split]) >= self.job["rows_per_file"]:
            self.flush(split)

    def reject(self, path: str, reason: str) -> None:
        self.rejected.append({"path": path, "reason": reason})

    def flush(self, split: str) -> None:
        from factory.shards import encode_parquet

        if not self.rows[split]:
            return
        name = f"{self.unit['stem']}-{len(self.files[split]):05d}.parquet"
        self.sink.put(f"{self.sink.root}/{split}/{name}", encode_parquet(self.rows[split], self.job["class_names"]))
        self.files[split].append(name)
        self.rows[split] = []

    def finish(self, seconds: float) -> dict:
        for split in self.rows:
            self.flush(split)
        marker = {"unit": self.unit["id"], "files": self.files, "counts": self.counts,
                  "names": {str(k): v for k, v in sorted(self.names.items())}, "rejected": self.rejected,
                  "seconds": round(seconds, 3)}
        self.sink.put(f"{self.sink.root}/{PARTS}/{self.unit['id']}.json", json.dumps(marker, sort_keys=True).encode())
        return marker


def _folder_files(fs, unit: dict, job: dict) -> tuple[list[str], list[str]]:
    """A class folder's image files (sorted) and its other files."""
    images, other = [], []
    for f in sorted(fs.find(unit["path"])):
        base = f.rsplit("/", 1)[-1]
        if base.startswith("."):
            continue
        (images if base.lower().endswith(IMAGE_SUFFIXES) else other).append(f)
    return images, other


def _convert_folder(fs, unit: dict, job: dict, out: _UnitWriter) -> None:
    images, other = _folder_files(fs, unit, job)
    for f in other:
        out.reject(_url(fs, f), "not an image file (suffix)")
    label, name = unit["label"], unit["class_name"]
    rel = {f: posixpath.relpath(f, job["src_path"]) for f in images}
    key = {f: rel[f].rsplit(".", 1)[0] for f in images}
    split = {f: unit["split"] or _split_of(rel[f], job) for f in images}
    per_class = job["per_class"]
    todo = images
    if per_class:  # the train images in order of their seeded hash; test images all, first
        train = sorted((f for f in images if split[f] == "train"), key=lambda f: _hash(job["seed"], "keep", rel[f]))
        todo = [f for f in images if split[f] == "test"] + train
    kept = 0
    for i in range(0, len(todo), READ_CHUNK):
        chunk = todo[i: i + READ_CHUNK]
        if per_class and all(split[f] == "train" for f in chunk) and kept >= per_class:
            break
        blobs = _fetch(fs, chunk)
        for f in chunk:
            if per_class and split[f] == "train" and kept >= per_class:
                continue
            data = blobs.get(f)
            if isinstance(data, BaseException):
                out.reject(_url(fs, f), f"unreadable: {type(data).__name__}: {data}")
                continue
            png, why = process_image(data, job)
            if png is None:
                out.reject(_url(fs, f), why)
                continue
            out.add(split[f], key[f], png, label, name)
            kept += split[f] == "train"


def _record_name(label: int, name: str | None, job: dict) -> str:
    names = job["class_names"]
    if names is not None and label < len(names):
        return names[label]
    return name if name is not None else str(label)


def _convert_records(fs, unit: dict, job: dict, out: _UnitWriter) -> None:
    keep = None if unit.get("keep") is None else set(unit["keep"])
    url, names = _url(fs, unit["path"]), job["class_names"]
    rows = _records(fs, unit, job)
    while True:
        try:
            key, img, label, name = next(rows)
        except StopIteration:
            break
        except Exception as e:  # a truncated tar, a corrupt Parquet page: keep what was read, report the rest
            out.reject(url, f"unreadable from here on: {type(e).__name__}: {e}")
            break
        split = unit["split"] or _split_of(key, job)
        if keep is not None and split == "train" and key not in keep:
            continue  # not among the class's K: not decoded
        where = f"{url}:{key.rsplit('/', 1)[-1]}"
        if label is None:
            out.reject(where, "no integer label (.cls / label column) and not a name in --class-names")
            continue
        if names is not None and label >= len(names):
            out.reject(where, f"label {label} is outside --class-names ({len(names)} classes)")
            continue
        png, why = process_image(img, job)
        if png is None:
            out.reject(where, why)
            continue
        out.add(split, key, png, label, names[label] if names is not None else (name or str(label)))


def convert_unit(row: dict, job: dict) -> dict:
    """Ray Data map function: one unit in, its files and marker written, one small row out."""
    from factory.shards import ShardSink

    t0 = time.perf_counter()
    unit = json.loads(row["unit"])
    fs, _ = fsspec.core.url_to_fs(job["src"], **job["storage_options"])
    sink = ShardSink(job["output"], [], job["storage_options"])
    out = _UnitWriter(sink, unit, job)
    if unit["kind"] == "folder":
        _convert_folder(fs, unit, job, out)
    else:
        _convert_records(fs, unit, job, out)
    marker = out.finish(time.perf_counter() - t0)
    return {"unit": unit["id"], "images": sum(sum(c.values()) for c in marker["counts"].values()),
            "rejected": len(marker["rejected"])}


def scan_unit(row: dict, job: dict) -> dict:
    """Ray Data map function for --per-class on tars and Parquet: per class, this file's K train
    candidates with the smallest hashes (labels and keys only; no image is decoded)."""
    unit = json.loads(row["unit"])
    fs, _ = fsspec.core.url_to_fs(job["src"], **job["storage_options"])
    best: dict[int, list] = {}
    items = ((key, label) for key, _, label, _ in _records(fs, unit, job, labels_only=True))
    for key, label in items:
        if label is None or unit["split"] == "test" or (unit["split"] is None and _split_of(key, job) == "test"):
            continue
        h = _hash(job["seed"], "keep", key)
        heap = best.setdefault(label, [])
        item = (-h, key)  # a max-heap of the K smallest
        if len(heap) < job["per_class"]:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    cands = [[label, -nh, key] for label, heap in best.items() for nh, key in heap]
    return {"unit": unit["id"], "candidates": json.dumps(cands)}


def probe_unit(row: dict, job: dict) -> dict:
    """Ray Data map function: the PIL modes of a unit's first few images (headers only)."""
    unit = json.loads(row["unit"])
    fs, _ = fsspec.core.url_to_fs(job["src"], **job["storage_options"])
    modes = []
    try:
        if unit["kind"] == "folder":
            blobs = [fs.cat_file(f) for f in _folder_files(fs, unit, job)[0][:4]]
        else:
            blobs = []
            for _, img, _, _ in _records(fs, unit, job):
                blobs.append(img)
                if len(blobs) == 4:
                    break
        for b in blobs:
            try:
                modes.append(Image.open(io.BytesIO(b)).mode)
            except Exception:  # a corrupt image says nothing about the mode; the conversion reports it
                pass
    except Exception:  # an unreadable unit is reported by the conversion, not by the probe
        pass
    return {"modes": json.dumps(modes)}


# --------------------------------------------------------------------------------------------- driver


def _read_class_names_file(path: str | None) -> tuple[list[str] | None, dict[str, str]]:
    """--class-names: a JSON list (ids in label order), a JSON object {id: description} (label order), or
    text lines ``<id> [description]`` (ImageNet's LOC_synset_mapping.txt)."""
    if not path:
        return None, {}
    with fsspec.open(path, "rt") as f:
        text = f.read()
    if path.endswith(".json"):
        data = json.loads(text)
        if isinstance(data, dict):
            return [str(k) for k in data], {str(k): str(v) for k, v in data.items()}
        return [str(k) for k in data], {}
    ids, desc = [], {}
    for line in text.splitlines():
        if line.strip():
            cid, _, rest = line.strip().partition(" ")
            ids.append(cid)
            if rest.strip():
                desc[cid] = rest.strip()
    return ids, desc


def _subdirs(fs, path: str) -> list[str]:
    return sorted(p.rstrip("/") for p in fs.ls(path, detail=False) if fs.isdir(p)
                  and not p.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_")))


def _split_dirs(fs, path: str) -> dict[str, str]:
    """{"train": dir, "test": dir} of the split folders SRC has (empty when it has none)."""
    dirs = {}
    if fs.isdir(f"{path}/train"):
        dirs["train"] = f"{path}/train"
        for t in TEST_DIRS:
            if fs.isdir(f"{path}/{t}"):
                dirs["test"] = f"{path}/{t}"
                break
    return dirs


def detect_format(fs, path: str) -> str:
    if fs.isfile(path):
        if path.endswith(".tar"):
            return "webdataset"
        if path.endswith(".parquet"):
            return "parquet"
        raise DataError(f"{path}: a single file must be a .tar or a .parquet")
    if not fs.isdir(path):
        raise DataError(f"source not found: {path}")
    # SRC itself and its split folders, one listing each (a class folder per class is not listed: --format)
    names = [n for d in [path, *_split_dirs(fs, path).values()] for n in fs.ls(d, detail=False)]
    for fmt, suffix in (("webdataset", ".tar"), ("parquet", ".parquet")):
        if any(n.endswith(suffix) for n in names):
            return fmt
    return "imagefolder"


def _folder_units(fs, path: str) -> tuple[list[dict], list[str]]:
    splits = _split_dirs(fs, path)
    if splits:
        per_split = {s: _subdirs(fs, d) for s, d in splits.items()}
        if "test" in splits and not per_split["test"] and fs.ls(splits["test"], detail=False):
            raise DataError(f"{_url(fs, splits['test'])} holds files, not class folders: sort a flat "
                            "val folder into <class>/ folders first")
    else:
        per_split = {None: _subdirs(fs, path)}
    class_names = sorted({d.rsplit("/", 1)[-1] for dirs in per_split.values() for d in dirs})
    if not class_names:
        raise DataError(f"image folder {_url(fs, path)} has no class folders")
    label_of = {n: i for i, n in enumerate(class_names)}
    units = []
    for split, dirs in per_split.items():
        for d in dirs:
            name = d.rsplit("/", 1)[-1]
            stem = f"c{label_of[name]:05d}"
            units.append({"id": f"{split}-{stem}" if split else stem, "stem": stem, "kind": "folder", "path": d,
                          "split": split, "label": label_of[name], "class_name": name})
    return units, class_names


def _file_units(fs, path: str, fmt: str) -> tuple[list[dict], dict[str, str]]:
    suffix = ".tar" if fmt == "webdataset" else ".parquet"
    if fs.isfile(path):
        groups = {None: [path]}
        base = posixpath.dirname(path)
    else:
        splits = _split_dirs(fs, path)
        groups = ({s: sorted(fs.glob(f"{d}/**/*{suffix}")) for s, d in splits.items()} if splits
                  else {None: sorted(fs.glob(f"{path}/**/*{suffix}"))})
        base = path
    units, stems, n = [], {}, 0
    for split, files in groups.items():
        for f in files:
            stem = f"f{n:05d}"
            n += 1
            stems[f] = posixpath.relpath(f, base)[: -len(suffix)]
            units.append({"id": f"{split}-{stem}" if split else stem, "stem": stem, "kind": fmt, "path": f,
                          "split": split})
    if not units:
        raise DataError(f"no {suffix} files under {_url(fs, path)}")
    return units, stems


def _check_columns(fs, path: str, image_column: str, label_column: str) -> None:
    """Parquet input: the columns are there (the schema only), so a wrong --label-column fails at once."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as fh:
        names = pq.ParquetFile(fh).schema_arrow.names
    missing = [c for c in (image_column, label_column) if c not in names]
    if missing:
        raise DataError(f"{_url(fs, path)} has no column {', '.join(missing)} (it has {', '.join(names)}): "
                        "name them with --image-column / --label-column")


def _run_map(units: list[dict], fn, job: dict):
    import ray

    ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=max(1, len(units)))
    return ds.map(fn, fn_kwargs={"job": job}, num_cpus=1).iter_rows()


def _select_per_class(units: list[dict], job: dict) -> None:
    """--per-class on tars / Parquet: merge the files' candidates, then give each unit its keys to keep."""
    best: dict[int, list] = {}
    for row in _run_map(units, scan_unit, job):
        for label, h, key in json.loads(row["candidates"]):
            heap = best.setdefault(label, [])
            item = (-h, key, row["unit"])
            if len(heap) < job["per_class"]:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    keep: dict[str, list] = {}
    for heap in best.values():
        for _, key, uid in heap:
            keep.setdefault(uid, []).append(key)
    for u in units:
        u["keep"] = sorted(keep.get(u["id"], []))


def _probe_mode(units: list[dict], job: dict) -> str:
    step = max(1, len(units) // 8)
    modes = [m for row in _run_map(units[::step][:8], probe_unit, job) for m in json.loads(row["modes"])]
    grey = sum(m in GREY_MODES for m in modes)
    return "L" if modes and grey * 2 > len(modes) else "RGB"


def _list_markers(sink) -> set[str]:
    folder = f"{sink.root}/{PARTS}"
    try:
        entries = os.listdir(folder) if sink.local else sink.fs.ls(folder, detail=False, refresh=True)
    except FileNotFoundError:
        return set()
    return {e.rsplit("/", 1)[-1][: -len(".json")] for e in entries if e.endswith(".json")}


def _finish(sink, units: list[dict], job: dict, descriptions: dict, params: dict) -> dict:
    """Aggregate the units' markers (small) into the class index, the rejected list and _SUCCESS."""
    counts = {"train": {}, "test": {}}
    names: dict[int, str] = {}
    rejected = io.BytesIO()
    n_rejected, files = 0, {"train": 0, "test": 0}
    paths = [f"{sink.root}/{PARTS}/{u['id']}.json" for u in units]
    for i in range(0, len(paths), 256):
        blobs = sink.fs.cat(paths[i: i + 256])
        for p in paths[i: i + 256]:
            m = json.loads(blobs[p])
            for split, c in m["counts"].items():
                for label, n in c.items():
                    counts[split][int(label)] = counts[split].get(int(label), 0) + n
            for label, name in m["names"].items():
                names.setdefault(int(label), name)
            for split, fs_ in m["files"].items():
                files[split] += len(fs_)
            for r in m["rejected"]:
                rejected.write((json.dumps(r, sort_keys=True) + "\n").encode())
                n_rejected += 1
    if job["class_names"] is not None:
        class_names = list(job["class_names"])
    else:
        n = max(names, default=-1) + 1
        class_names = [names.get(i, str(i)) for i in range(n)]
    if not class_names or not counts["train"]:
        raise DataError(f"no readable train image in {job['src']} ({n_rejected} rejected, see "
                        f"{sink.output}/{REJECTED})")
    index = {"class_names": class_names, "size": [job["size"], job["size"]], "mode": job["mode"],
             "resize": job["resize"],
             "counts": {s: [c.get(i, 0) for i in range(len(class_names))] for s, c in counts.items() if c}}
    if descriptions:
        index["descriptions"] = {n: descriptions[n] for n in class_names if n in descriptions}
    sink.put(f"{sink.root}/{REJECTED}", rejected.getvalue())
    sink.put(f"{sink.root}/{CLASS_INDEX}", json.dumps(index, indent=1).encode())
    summary = {"output": sink.output, "classes": len(class_names), "mode": job["mode"],
               "size": job["size"], "images": {s: sum(c.values()) for s, c in counts.items()}, "files": files,
               "rejected": n_rejected, "params": params}
    sink.put(f"{sink.root}/{SUCCESS}", json.dumps(summary, indent=1, sort_keys=True).encode())
    return summary


def prepare(src: str, output: str, size: int, resize: str = "center-crop", mode: str = "auto",
            per_class: int | None = None, seed: int = 0, test_fraction: float = 0.0, rows_per_file: int = 1000,
            min_size: int | None = None, class_names_file: str | None = None, image_column: str = "image",
            label_column: str = "label", fmt: str = "auto", storage_options: dict | None = None,
            address: str | None = None, progress: bool = False) -> dict:
    """Convert ``src`` into the factory's real-set Parquet layout under ``output``; returns the summary.
    Reruns resume: finished units are skipped, and a finished output (``_SUCCESS``) is left as it is."""
    from factory.dataplane import ensure_ray
    from factory.shards import ShardSink

    if size < 1:
        raise DataError(f"--size must be >= 1, got {size}")
    if resize not in RESIZE_MODES:
        raise DataError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if mode not in ("auto", "L", "RGB"):
        raise DataError(f"--mode must be auto, L or RGB, got {mode!r}")
    if per_class is not None and per_class < 1:
        raise DataError(f"--per-class must be >= 1, got {per_class}")
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if rows_per_file < 1:
        raise DataError(f"--rows-per-file must be >= 1, got {rows_per_file}")
    min_size = max(1, size // 4) if min_size is None else min_size
    storage_options = storage_options or {}
    params = {"src": src.rstrip("/"), "size": size, "resize": resize, "mode": mode, "per_class": per_class,
              "seed": seed, "test_fraction": test_fraction, "rows_per_file": rows_per_file, "min_size": min_size,
              "class_names_file": class_names_file, "image_column": image_column, "label_column": label_column,
              "format": fmt}

    sink = ShardSink(output, [], storage_options)
    stored = None
    if sink.fs.exists(f"{sink.root}/{PARAMS}"):
        stored = json.loads(sink.fs.cat_file(f"{sink.root}/{PARAMS}"))
        differ = sorted(k for k in params if stored["params"].get(k) != params[k])
        if differ:
            raise DataError(f"{output} was prepared with other parameters ({', '.join(differ)}: "
                            f"{[stored['params'].get(k) for k in differ]}): choose another --output")
        if sink.fs.exists(f"{sink.root}/{SUCCESS}"):
            return {**json.loads(sink.fs.cat_file(f"{sink.root}/{SUCCESS}")), "already_complete": True}

    fs, src_path = fsspec.core.url_to_fs(src, **storage_options)
    src_path = src_path.rstrip("/")
    if fmt == "auto":
        fmt = detect_format(fs, src_path)
    elif fmt not in ("imagefolder", "webdataset", "parquet"):
        raise DataError(f"--format must be auto, imagefolder, webdataset or parquet, got {fmt!r}")
    ids, descriptions = _read_class_names_file(class_names_file)
    stems: dict[str, str] = {}
    if fmt == "imagefolder":
        units, class_names = _folder_units(fs, src_path)
    else:
        units, stems = _file_units(fs, src_path, fmt)
        class_names = ids
    if test_fraction > 0 and any(u["split"] for u in units):
        raise DataError("--test-fraction is for sources without split folders; this one has train/ (and val/)")
    if fmt == "parquet":
        _check_columns(fs, units[0]["path"], image_column, label_column)
    # absolute for the workers (a relative local path means nothing on another node or working directory)
    job = {"src": _url(fs, src_path), "src_path": src_path if fs.isdir(src_path) else posixpath.dirname(src_path),
           "output": sink.root if sink.local else output, "storage_options": storage_options, "size": size,
           "resize": resize, "mode": mode,
           "per_class": per_class, "seed": seed, "test_fraction": test_fraction, "rows_per_file": rows_per_file,
           "min_size": min_size, "image_column": image_column, "label_column": label_column, "stems": stems,
           "class_names": class_names, "name_to_label": {n: i for i, n in enumerate(ids or [])}}
    if stored is None:
        sink.check_writable()
    ensure_ray(address)
    if mode == "auto":
        job["mode"] = stored["mode"] if stored else _probe_mode(units, job)
    if per_class and fmt != "imagefolder":
        _select_per_class(units, job)
    if stored is None:
        sink.put(f"{sink.root}/{PARAMS}", json.dumps({"params": params, "mode": job["mode"], "format": fmt},
                                                     indent=1, sort_keys=True).encode())

    done = _list_markers(sink)
    pending = [u for u in units if u["id"] not in done]
    if pending:
        t0, n = time.perf_counter(), 0
        for _ in _run_map(pending, convert_unit, job):
            n += 1
            if progress and (n == len(pending) or n % max(1, len(pending) // 20) == 0):
                print(f"prepare: {n}/{len(pending)} units ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    summary = _finish(sink, units, job, descriptions, params)
    return {**summary, "units": {"planned": len(units), "made": len(pending), "already_complete": len(done)}}
