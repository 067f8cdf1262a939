"""Downstream classifier: a torchvision ResNet trained on Ray Train, judged on the real test split.

The training set is synthetic (the factory's Parquet shards), the real train split or both ("mixed"). A
worker's split of at most ``HOLD_BYTES`` is read once by the worker itself and held (:func:`read_held`); a
larger one is a lazy Ray Dataset of ``{"image": uint8 (H, W[, 3]), "label": int64}`` rows, read and decoded by
Ray Data while the workers consume their split of it (files in a new seeded order every epoch, rows mixed in
a local shuffle buffer), so no process holds the set. The real test split is read the same way. Several
classifiers (one per recipe and mode, and real) train in one Ray Train run, so its start-up is paid once:
one after another, every worker on its share of the rows (``parallel: data``, DDP), or dealt out whole to
the workers (``parallel: runs``: many small sets on CPUs, no gradient traffic). ``checkpoints`` times a
classifier (evenly over its epochs) its worker calls ``ray.train.report`` with a checkpoint (model,
optimizer, epoch, history, finished results) under ``<storage_path>/<name>``; a rerun with the same storage
path and name resumes from the latest checkpoint (Ray Train V2 reloads the run's snapshot and
``ray.train.get_checkpoint()`` hands it to the workers), and classifiers that already reached their epochs are
read back without training.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time

from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from factory.config import RESNETS, DownstreamConfig
from factory.data import RealSet, decode_image, load_real, shard_files, to_pixels

BLOCK_BYTES = 16 << 20  # decoded bytes of a packaged real set's part (one Ray Data block)
SHUFFLE_BYTES = 256 << 20  # decoded bytes a worker's local shuffle buffer may hold
HOLD_BYTES = 256 << 20  # a worker's split up to this many decoded bytes is read once and held (see held)
TEST = "test"  # the Ray Train dataset name of the real test split
DATA_CPUS = 1  # CPUs the Ray Train workers leave to Ray Data's read and decode tasks
# Ray Train's controller takes one report from each worker per poll, every 2 s by default: a classifier of a few
# images would wait on it at every report (the distillation test: 80 s at 2 s, 42 s at 0.5 s, 40 s at 0.2 s)
POLL_SECONDS = "0.5"


def base_width(image_size: int) -> int:
    """Channels of a ResNet's first stage for this input size: torchvision's 64 from 17 px up; 32 (half: a
    quarter of the FLOPs and parameters) for tiny inputs like digits' 8x8, where the 4 stages run at 8, 4, 2
    and 1 px. (16 channels measured 0.02-0.04 below the full width on every quickstart set.)"""
    return 32 if image_size <= 16 else 64


def resnet(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A torchvision ResNet with its stem fitted to the input: CIFAR-style (3x3, no maxpool) up to 32 px, and
    its stages narrowed to :func:`base_width` (32, 64, 128, 256 channels instead of 64 ... 512) up to 16 px."""
    import torchvision

    if name not in RESNETS:
        raise ValueError(f"unknown downstream model {name!r}; expected one of {', '.join(RESNETS)}")
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    width = base_width(image_size)
    if width != 64:  # rebuild the stages narrower with torchvision's own blocks, initialised as torchvision does
        block = type(model.layer1[0])
        depths = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
        model.inplanes = width
        model.bn1 = model._norm_layer(width)
        for i, depth in enumerate(depths):
            setattr(model, f"layer{i + 1}", model._make_layer(block, width << i, depth, stride=1 if i == 0 else 2))
        model.fc = nn.Linear((width << 3) * block.expansion, num_classes)
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
    if image_size <= 32:
        model.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def convnet(num_classes: int, in_channels: int, size: tuple[int, int], width: int = 128) -> nn.Module:
    """The dataset-distillation benchmark's ConvNet (Gidaris & Komodakis; the DC/DM/MinimaxDiffusion protocol of
    paper 003): blocks of 3x3 conv, instance norm (a GroupNorm group per channel), ReLU and 2x2 average pooling,
    then one linear layer; depth 2 up to 16 px (digits' 8x8 ends at 2x2), 3 up to 32 (ConvNet-3), 4 above."""
    h, w = size
    depth = 2 if max(h, w) <= 16 else 3 if max(h, w) <= 32 else 4
    layers, c = [], in_channels
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width), nn.ReLU(inplace=True),
                   nn.AvgPool2d(2)]
        c, h, w = width, h // 2, w // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * h * w, num_classes))


def classifier(name: str, num_classes: int, in_channels: int, size: tuple[int, int]) -> nn.Module:
    """The downstream model ``name``: a ResNet sized for the input (:func:`resnet`) or the ConvNet."""
    if name == "convnet":
        return convnet(num_classes, in_channels, tuple(size))
    return resnet(name, num_classes, in_channels, max(size))


# --- data -----------------------------------------------------------------------------------------


class TrainSet(NamedTuple):
    """One classifier's training set: synthetic shards (their Parquet files or folder; ``shard_images`` rows in
    all), the real train split, or both ("mixed"); ``real_per_class``: only a random subset of the real train
    split, that many images of each class (drawn with the run's seed). ``seed`` is added to the run's seed
    (the classifier's initialisation, order, augmentation and subset)."""

    name: str
    shards: str | list[str] | None
    shard_images: int
    real: bool
    real_per_class: int | None = None
    seed: int = 0


def random_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``per_class`` images of each class (all of a smaller class)."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(idx, min(per_class, len(idx)), replace=False)
             for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.sort(np.concatenate(picks))


def decode_png(batch: dict, mode: str, size: tuple[int, int]) -> dict:
    """``map_batches`` step: encoded images (PNG, JPEG or WebP; the Image struct or plain bytes) -> uint8 arrays
    (B, H, W[, 3]) in the test set's mode and size."""
    images = []
    for data in batch["image"]:
        img = decode_image(data, "downstream training shard").convert(mode)
        if img.size != (size[1], size[0]):
            raise ValueError(f"an image is {img.size[0]}x{img.size[1]}, the real test images are "
                             f"{size[1]}x{size[0]}")
        images.append(np.asarray(img, dtype=np.uint8))
    return {"image": np.stack(images), "label": np.asarray(batch["label"]).astype(np.int64)}


def _read_parquet(paths: str | list[str], mode: str, size: tuple[int, int], seed: int | None):
    """Parquet files (or a folder of them) on any fsspec URI, decoded in ``map_batches``. With ``seed``, the file
    order is shuffled anew (seeded) on every execution, i.e. every epoch."""
    import fsspec
    import ray
    from fsspec.implementations.local import LocalFileSystem
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    listed = [paths] if isinstance(paths, str) else list(paths)
    fs, _ = fsspec.core.url_to_fs(listed[0])
    kwargs = {}
    if not isinstance(fs, LocalFileSystem):  # any fsspec URI: hand pyarrow the fsspec filesystem
        kwargs["filesystem"] = PyFileSystem(FSSpecHandler(fs))
    if seed is not None:
        kwargs["shuffle"] = ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True)
    listed = [fsspec.core.url_to_fs(p)[1] for p in listed]
    ds = ray.data.read_parquet(listed, file_extensions=["parquet"], **kwargs).select_columns(["image", "label"])
    return ds.map_batches(decode_png, fn_kwargs={"mode": mode, "size": size}, batch_format="numpy", batch_size=256)


@lru_cache(maxsize=2)
def _whole_split(source: str, root: str | None, split: str) -> RealSet:
    return load_real(source, split, root)


def _checked_split(source: str, root: str | None, split: str, mode: str, size) -> RealSet:
    """The real ``split`` (loaded once per process), refused when its images are not the set's mode and size."""
    real = _whole_split(source, root, split)
    if real.mode != mode or real.size != tuple(size):
        raise ValueError(f"the real {split} images are {real.mode} {real.size[1]}x{real.size[0]}, the set's "
                         f"are {mode} {size[1]}x{size[0]}")
    return real


def _real_part(batch: dict, source: str, root: str | None, split: str, parts: int, mode: str,
               size: tuple[int, int]) -> dict:
    """``map_batches`` step in a Ray task: part ``i`` of ``parts`` (every parts-th image) of a split loaded in
    that worker process (once: the small packaged, folder and WebDataset sources have no per-file reader)."""
    real = _checked_split(source, root, split, mode, size)
    idx = np.concatenate([np.arange(int(i), len(real.labels), parts) for i in batch["id"]])
    return {"image": real.images[idx], "label": real.labels[idx].astype(np.int64)}


def real_dataset(data, split: str, info, seed: int | None = None):
    """The real ``split`` as a lazy Ray Dataset of uint8 images and labels; nothing is loaded on the driver.

    ``data`` names the source (``source``, ``root``: a ``DataConfig``) and ``info`` its classes, size, mode and
    counts (a ``RealInfo``). A Parquet set is read file by file (with ``seed``: in a new order every epoch);
    the other sources are loaded inside Ray tasks, in parts of about ``BLOCK_BYTES``.
    """
    import ray

    size, mode = tuple(info.size), info.mode
    if data.source == "parquet":
        import fsspec

        fs, path = fsspec.core.url_to_fs(data.root)
        if fs.isdir(f"{path.rstrip('/')}/{split}"):  # the prepared layout; else every file is this split
            root = data.root.rstrip("/") + f"/{split}"
        else:
            root = data.root
        return _read_parquet(root, mode, size, seed)
    n = int(sum(info.counts[split]))
    parts = max(1, math.ceil(n * int(np.prod(size)) * (1 if mode == "L" else 3) / BLOCK_BYTES))
    return ray.data.range(parts, override_num_blocks=parts).map_batches(
        _real_part, fn_kwargs={"source": data.source, "root": data.root, "split": split, "parts": parts,
                               "mode": mode, "size": size}, batch_size=1, batch_format="numpy")


def train_size(train: TrainSet, info) -> tuple[str, int]:
    """A classifier's set: its mode ("synthetic" | "real" | "mixed") and number of images."""
    if not train.shards and not train.real:
        raise ValueError(f"downstream run {train.name!r} needs synthetic shards, the real train split or both")
    if train.real and train.real_per_class:
        real = sum(min(int(c), train.real_per_class) for c in info.counts["train"])
    else:
        real = int(sum(info.counts["train"])) if train.real else 0
    n = (int(train.shard_images) if train.shards else 0) + real
    return ("mixed" if train.shards and train.real else "synthetic" if train.shards else "real"), n


def build_dataset(train: TrainSet, data, info, seed: int = 0):
    """One classifier's training set as a lazy Ray Dataset (read and decoded while the workers train), its mode
    ("synthetic" | "real" | "mixed") and its number of images. Files come in a new seeded order every epoch;
    the workers' local shuffle buffers mix their rows (see :func:`shuffle_buffer`)."""
    mode, n = train_size(train, info)
    parts = []
    if train.shards:
        parts.append(_read_parquet(train.shards, info.mode, tuple(info.size), seed))
    if train.real:
        parts.append(real_dataset(data, "train", info, seed))
    return (parts[0].union(parts[1]) if len(parts) == 2 else parts[0]), mode, n


def shuffle_buffer(n: int, batch_size: int, image_bytes: int) -> int:
    """Rows in a worker's local shuffle buffer: a shard holds ONE class, so the buffer holds many shards' rows
    (the whole set when it is small, as the quickstart's 1,350 8x8 images), capped at ``SHUFFLE_BYTES``."""
    return int(max(8 * batch_size, min(n, SHUFFLE_BYTES // max(1, image_bytes))))


def scaling_config(cfg: DownstreamConfig, cluster_cpus: float, workers: int | None = None):
    """Ray Train's ScalingConfig for ``workers`` (default ``cfg.num_workers``): ``use_gpu`` as configured, and
    the CPU workers leave one CPU to Ray Data, which reads and decodes while they train (a read task beside
    workers that hold every CPU waits forever)."""
    from ray.train import ScalingConfig

    workers = workers or cfg.num_workers
    if cfg.use_gpu:  # GPU workers reserve no CPU
        return ScalingConfig(num_workers=workers, use_gpu=True)
    per_worker = min(1.0, (cluster_cpus - DATA_CPUS) / workers)
    if per_worker <= 0:
        raise ValueError(f"downstream: {workers} CPU workers need more than the cluster's "
                         f"{cluster_cpus:g} CPUs ({DATA_CPUS} left to Ray Data)")
    return ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": per_worker})


def deal(costs: list[float], workers: int) -> list[int]:
    """The worker of each run under ``parallel: runs``: longest first to the least loaded (ties: the lower
    rank), so the busiest worker, which the others wait for, carries as little as the deal allows."""
    load, rank = [0.0] * workers, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        rank[i] = min(range(workers), key=lambda w: load[w])
        load[rank[i]] += costs[i]
    return rank


def parquet_files(paths: str | list[str]) -> list[str]:
    """Every Parquet file of ``paths`` (files or folders; any fsspec URI) as URIs, in sorted order."""
    out = []
    for p in [paths] if isinstance(paths, str) else paths:
        fs, files = shard_files(p, ".parquet")
        out += [fs.unstrip_protocol(f) for f in files]
    return out


def held(n: int, image_bytes: int) -> bool:
    """Whether a worker's split of ``n`` images is read once and held for all epochs: every streamed epoch
    is a Ray Data execution (a scheduling round and read tasks: seconds each on 2 cores, more than an
    epoch of the quickstart's 1,350 8x8 images), while a split this small costs at most ``HOLD_BYTES``, a
    bound that does not grow with the set (larger splits stream every epoch)."""
    return n * image_bytes <= HOLD_BYTES


# --- training loop (runs on every Ray Train worker) ------------------------------------------------


def read_held(files: list[str], real: dict | None, mode: str, size: tuple[int, int], rank: int,
              world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A worker's held split, read straight from storage: every ``world``-th row (from ``rank``) of the Parquet
    ``files`` in their sorted order, then of the real split ``real`` (``{"source", "root", "split"}``, and
    ``"per_class"``, ``"subset_seed"`` for a random subset of it: :func:`random_subset`).

    No Ray Data execution (each costs a scheduling round and task starts: 15-19 s per classifier on 2 cores,
    more than training the quickstart's sets), and the rows come in the same order on every run, so a seeded
    run trains the same classifier."""
    import fsspec
    import pyarrow.parquet as pq

    images, labels, offset = [], [], 0
    for url in files:
        fs, path = fsspec.core.url_to_fs(url)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["image", "label"])
        rows = list(range((rank - offset) % world, table.num_rows, world))
        offset += table.num_rows
        if rows:
            part = table.take(rows)
            batch = decode_png({"image": part.column("image").to_pylist(),
                                "label": part.column("label").to_numpy()}, mode, size)
            images.append(torch.from_numpy(batch["image"]))
            labels.append(torch.from_numpy(batch["label"]))
    if real is not None:
        split = _checked_split(real["source"], real["root"], real["split"], mode, size)
        idx = np.arange(len(split.labels))
        if real.get("per_class"):
            idx = random_subset(split.labels, real["per_class"], real["subset_seed"])
        idx = idx[(rank - offset) % world::world]
        images.append(torch.from_numpy(np.ascontiguousarray(split.images[idx])))
        labels.append(torch.from_numpy(split.labels[idx].astype(np.int64)))
    return torch.cat(images), torch.cat(labels)


def held_batches(split: tuple[torch.Tensor, torch.Tensor], batch_size: int, seed: int):
    """One epoch over a held split: a seeded permutation in whole batches (drop_last, like the stream)."""
    images, labels = split
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[i:i + batch_size]
        yield {"image": images[idx], "label": labels[idx]}




def _resized_crop(x: torch.Tensor, gen: torch.Generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Per-image random-resized crop back to the batch's size (torchvision's op; its parameters drawn from
    ``gen``, so a seeded run is repeatable)."""
    from torchvision.transforms.v2 import functional as TF

    n, _, h, w = x.shape
    area = torch.empty(n).uniform_(*scale, generator=gen) * h * w
    aspect = torch.exp(torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen))
    ch = (area / aspect).sqrt().round().clamp(1, h).long()
    cw = (area * aspect).sqrt().round().clamp(1, w).long()
    top = (torch.rand(n, generator=gen) * (h - ch + 1)).long()
    left = (torch.rand(n, generator=gen) * (w - cw + 1)).long()
    return torch.stack([TF.resized_crop(x[i], int(top[i]), int(left[i]), int(ch[i]), int(cw[i]), [h, w],
                                        antialias=True) for i in range(n)])


def augment(x: torch.Tensor, y: torch.Tensor, config: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch's augmentation: padded random crop (or random-resized crop), optional horizontal flip,
    and CutMix on a ``config["cutmix"]`` share of batches (torchvision's; its targets are then the two hard
    labels mixed by area). Returns the images and the targets (class ids, or class probabilities after CutMix)."""
    if config.get("augment", "crop") == "resized_crop":
        x = _resized_crop(x, gen)
    else:
        x = _random_crop(x, max(1, config["image_size"] // 8), gen)
    if config.get("flip"):
        x = torch.where((torch.rand(len(x), generator=gen) < 0.5)[:, None, None, None], x.flip(-1), x)
    if config.get("cutmix") and float(torch.rand(1, generator=gen)) < config["cutmix"]:
        from torchvision.transforms import v2

        with torch.random.fork_rng(devices=[]):  # CutMix draws from the global generator: seed it from ours
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
            x, y = v2.CutMix(num_classes=config["num_classes"])(x, y)
    return x, y


def _random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the reflect-padded batch back to its size."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])


def _test_batches(config: dict, device: torch.device):
    """The real test split in batches of 512: read straight from storage when it is small (``test_held``),
    else streamed by Ray Data."""
    import ray.train

    if config["test_held"] is None:
        yield from ray.train.get_dataset_shard(TEST).iter_torch_batches(batch_size=512, device=device)
        return
    images, labels = read_held([], config["test_held"], config["image_mode"], tuple(config["size"]), 0, 1)
    for i in range(0, len(labels), 512):
        yield {"image": images[i:i + 512].to(device), "label": labels[i:i + 512].to(device)}


def _evaluate(model: nn.Module, config: dict, rank: int, world: int, device: torch.device) -> dict:
    """Test counts per class, ``{"correct": [...], "images": [...]}``: rank 0 reads the whole test split (an
    equal split would drop rows) and broadcasts its counts."""
    import torch.distributed as dist

    counts = torch.zeros(2, config["num_classes"], dtype=torch.float64, device=device)
    if rank == 0:
        model.eval()
        with torch.no_grad():
            for batch in _test_batches(config, device):
                y = batch["label"]
                hit = (model(to_pixels(batch["image"])).argmax(1) == y).double()
                counts[0].index_add_(0, y, hit)
                counts[1].index_add_(0, y, torch.ones_like(hit))
    if world > 1 and dist.is_initialized():
        dist.broadcast(counts, 0)
    counts = counts.cpu().long()
    return {"correct": counts[0].tolist(), "images": counts[1].tolist()}


def report_epochs(start: int, epochs: int, every: int) -> list[int]:
    """The epochs (counted from 1) after which a classifier started at epoch ``start`` reports and saves a
    checkpoint: every ``every``-th and the last (the distillation protocol's thousand epochs of a few images
    would otherwise spend their time in Ray Train's reports)."""
    return [e for e in range(start + 1, epochs + 1) if e % every == 0 or e == epochs]


def accuracy(counts: dict) -> float:
    return float(sum(counts["correct"]) / max(1, sum(counts["images"])))


def train_loop(config: dict) -> None:
    """The Ray Train worker loop over ``config["runs"]``, one classifier each, in order.

    ``parallel: data``: every worker trains every classifier on its share of the rows (DDP). ``parallel: runs``:
    each worker trains the whole classifiers dealt to it (``spec["rank"]``) alone, and pads its reports to the
    busiest worker's count (Ray Train wants as many from each). Every epoch ends with ``ray.train.report`` and
    a checkpoint of the run in progress (model, optimizer, epoch, history) plus the results of the runs
    already finished ("done"), one file pair per worker that trains (merged into one checkpoint folder). On a
    resumed trainer, finished runs are skipped and a run in progress continues from its epoch, whichever
    worker it is dealt to now.
    """
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not config["use_gpu"]:
        torch.set_num_threads(1)
    device = ray.train.torch.get_device()

    states, done = {}, {}  # run name -> its state in progress; run name -> its result
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            for f in sorted(os.listdir(d)):
                if f.startswith("state") and f.endswith(".pt"):
                    state = torch.load(os.path.join(d, f), map_location=device, weights_only=False)
                    states[state["current"]] = state
                    _merge(done, state["done"])
    epochs = config["epochs"]
    todo = [s for s in config["runs"] if done.get(s["name"], {}).get("epochs", 0) < epochs]
    by_runs = config["parallel"] == "runs"
    mine = [s for s in todo if s["rank"] == rank] if by_runs else todo
    last = {"current": None}
    for spec in mine:
        last = _train_one(config, spec, states.get(spec["name"]), done, rank, world, device)
    if by_runs:  # as many reports as the busiest worker, each with this worker's last state and results
        left = [0] * world
        for s in todo:
            left[s["rank"]] += len(report_epochs(states.get(s["name"], {}).get("epoch", 0), epochs,
                                                 config["report_every"]))
        for _ in range(max(left) - left[rank]):
            _report(config, {**last, "done": dict(done)}, rank, trains=True)


def _merge(done: dict, other: dict) -> None:
    """Fold one worker's finished results into ``done``: where two workers hold a run, the one trained to more
    epochs is the newer (each worker carries the results it read back, as they were)."""
    for name, r in other.items():
        if r["epochs"] >= done.get(name, {}).get("epochs", 0):
            done[name] = r


def _report(config: dict, state: dict, rank: int, trains: bool) -> None:
    """``ray.train.report`` of ``state``: a worker that trains (rank 0 under ``parallel: data``, every worker
    under ``runs``) saves it as ``state-<rank>.pt`` beside ``done-<rank>.json`` (its finished results); the
    reported metrics stay small (Ray Train logs each report)."""
    import ray.train
    from ray.train import Checkpoint

    metrics = {"current": state["current"], "epoch": state.get("epoch"), "finished": len(state["done"])}
    if not trains:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, os.path.join(d, f"state-{rank}.pt"))
        with open(os.path.join(d, f"done-{rank}.json"), "w") as f:
            json.dump(state["done"], f)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def _train_one(config: dict, spec: dict, state: dict | None, done: dict, rank: int, world: int,
               device: torch.device) -> dict:
    """Train and judge one classifier; its result joins ``done`` (shared with the caller) at the last epoch.
    Returns its last reported state.
    Under ``parallel: runs`` this worker trains it alone: its rows, seeds and steps are those of a one-worker
    run, so the classifier is the same whichever worker it is dealt to."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    name = spec["name"]
    by_runs = config["parallel"] == "runs"
    part, parts = (0, 1) if by_runs else (rank, world)  # this worker's share of the rows
    ddp = parts > 1 and dist.is_initialized()
    seed = config["seed"] + spec.get("seed", 0)
    torch.manual_seed(seed + part)
    gen = torch.Generator()
    net = classifier(config["model"], config["num_classes"], config["in_channels"], tuple(config["size"]))
    model = ray.train.torch.prepare_model(net, parallel_strategy=None if by_runs else "ddp")
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4)
    start, history = 0, []
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["epoch"], list(state["history"])

    epochs, batch_size = config["epochs"], spec["batch_size"]
    steps = max(1, spec["train_images"] // parts // batch_size)  # per epoch and worker
    if spec["held"]:  # read once, straight from storage
        split = read_held(spec["files"], spec["real"], config["image_mode"], tuple(config["size"]), part, parts)
    else:
        shard = ray.train.get_dataset_shard(name)
    state = {"current": None}
    reports, shown = set(report_epochs(start, epochs, config["report_every"])), start
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, images since the last report
    began = time.perf_counter()
    for epoch in range(start, epochs):
        model.train()
        gen.manual_seed(seed + part + 1000 * epoch)  # augmentation: the same on a resumed run
        if spec["held"]:
            batches = held_batches(split, batch_size, seed + 1000 * epoch + part)
        else:
            batches = shard.iter_torch_batches(
                batch_size=batch_size, drop_last=True,  # equal steps on every worker; BatchNorm needs > 1 image
                local_shuffle_buffer_size=spec["shuffle_buffer"],
                local_shuffle_seed=seed + 1000 * epoch + part,
            )
        for i, batch in enumerate(batches):
            t = min(1.0, (epoch + i / steps) / epochs)  # cosine schedule over the whole run
            for group in opt.param_groups:
                group["lr"] = config["lr"] * 0.5 * (1.0 + math.cos(math.pi * t))
            x, y = augment(to_pixels(batch["image"]), batch["label"], config, gen)
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum[0] += loss.item() * len(x)
            loss_sum[1] += len(x)
        if epoch + 1 in reports:  # the history: one entry per report, the mean loss since the last one
            if ddp:
                dist.all_reduce(loss_sum)
            history.append({"epoch": epoch + 1, "loss": float(loss_sum[0] / max(loss_sum[1], 1)),
                            "seconds": round(time.perf_counter() - began, 2)})  # its training, on this worker
            loss_sum.zero_()
        if epoch + 1 == epochs:  # judged once, at the end: every pass over the test set is a Ray Data execution
            if ddp:  # every worker holds rank 0's BatchNorm statistics
                for b in net.buffers():
                    dist.broadcast(b, 0)
            counts = _evaluate(net, config, part, parts, device)
            history[-1]["test_accuracy"] = accuracy(counts)
            done[name] = {"accuracy": accuracy(counts), "test_counts": counts, "epochs": epochs,
                          "history": list(history), "resumed_from": start,
                          "train_images": spec["train_images"], "mode": spec["mode"], "held": spec["held"],
                          "seed": seed}
        if epoch + 1 not in reports:
            continue
        # the results travel in the checkpoint; under ``data`` rank 0 alone saves the (replicated) state
        trains = by_runs or rank == 0
        state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                 "history": history, "current": name, "done": dict(done)}
        _report(config, state, rank, trains)
        if trains and config.get("progress") is not None:  # the driver's bar: the epochs since the last report
            try:
                config["progress"].put_nowait((name, epoch + 1, spec["train_images"] * (epoch + 1 - shown)))
            except Exception:  # a full or lost queue costs the bar a tick, never the run
                pass
        shown = epoch + 1
        began = time.perf_counter()
    return state


# --- driver ----------------------------------------------------------------------------------------


def _done(result) -> dict:
    """The finished classifiers of a Ray Train result: the union of its latest checkpoint's ``done*.json``
    (one per worker that trains; older runs reported them in the metrics)."""
    done = {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            for f in sorted(os.listdir(d)):
                if f.startswith("done") and f.endswith(".json"):
                    with open(os.path.join(d, f)) as fh:
                        _merge(done, json.load(fh))
    return done or dict((result.metrics or {}).get("done") or {})


def _finished(path: str, storage_filesystem) -> dict:
    """The finished runs ("done") recorded by the trainer at ``path``; {} when there is none yet."""
    from ray.train import Result

    try:
        result = Result.from_path(path, storage_filesystem=storage_filesystem)
    except RuntimeError:  # no run there yet, or no checkpoint reported
        return {}
    return _done(result)


@contextlib.contextmanager
def _poll_every(seconds: str):
    """Ray Train's controller polls its workers every ``seconds`` during the fit (it reads the interval from the
    driver's environment when the fit starts), unless the user set ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``."""
    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    if key in os.environ:
        yield
        return
    os.environ[key] = seconds
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _fit_with_bar(trainer, queue, total: int, progress: bool):
    """``trainer.fit()`` (on this thread: Ray Train handles signals) while a thread moves a bar over the
    images trained (epochs x set size), fed through ``queue`` by the workers that train."""
    import threading

    if queue is None:
        return trainer.fit()
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(queue, stop, total), name="downstream-bar", daemon=True)
    follower.start()
    try:
        return trainer.fit()
    finally:
        stop.set()
        follower.join(timeout=5)


def _follow(queue, stop, total: int) -> None:
    import queue as queues

    from factory.console import bar

    with bar(total, "downstream", unit="img") as shown:
        while True:
            try:
                name, epoch, images = queue.get(timeout=0.5)
            except queues.Empty:
                if stop.is_set():
                    return
                continue
            except Exception:  # the queue actor went away with Ray: the run decides
                return
            shown.update(images)
            shown.set_postfix_str(f"{name} epoch {epoch}", refresh=False)


def train_and_evaluate_many(runs: list[TrainSet], data, info, cfg: DownstreamConfig, storage_path: str,
                            name: str, seed: int = 0, storage_filesystem=None, progress: bool = False) -> dict[str, dict]:
    """Train one classifier per :class:`TrainSet` in ONE Ray Train run and judge each on the real test split.

    ``data`` names the real set (``source``, ``root``) and ``info`` its classes, size, mode and counts: its
    splits stream through Ray Data like the shards, nothing is loaded here. One worker group, started once,
    trains the classifiers in order (each from its own fresh initialisation with the same seed), so a run of
    many small sets pays Ray Train's start-up once (``cfg.parallel``: every worker on every classifier's
    rows, or each worker on the whole classifiers dealt to it; then no more workers than classifiers start).
    Checkpoints live under ``<storage_path>/<name>``; a rerun skips the finished classifiers and resumes the
    one in progress (under ``parallel: runs``, each worker's). Returns run name -> ``{"accuracy",
    "test_counts", "epochs", "train_images", "mode", "history", "resumed_from", "epochs_trained"}``, where
    ``epochs_trained`` counts the epochs this call ran (0: read back). ``progress``: a bar over the images
    to train (count, images/s, ETA), fed by the workers that train.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, RunConfig
    from ray.train.torch import TorchTrainer

    names = [r.name for r in runs]
    if len(set(names)) != len(names) or TEST in names:
        raise ValueError(f"downstream run names must be unique and not {TEST!r}, got {names}")
    if storage_filesystem is None and "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)
    before = _finished(f"{storage_path.rstrip('/')}/{name}", storage_filesystem)
    todo = [r for r in runs if before.get(r.name, {}).get("epochs", 0) < cfg.epochs]
    done = dict(before)
    if todo:
        image_bytes = int(np.prod(info.size)) * (1 if info.mode == "L" else 3)
        root = data.root if data.root is None or "://" in data.root else os.path.abspath(data.root)  # any cwd
        test_held = held(int(sum(info.counts["test"])), image_bytes)
        datasets, specs = {} if test_held else {TEST: real_dataset(data, "test", info)}, []
        by_runs = cfg.parallel == "runs"
        workers = min(cfg.num_workers, len(todo)) if by_runs else cfg.num_workers
        parts = 1 if by_runs else workers  # the workers that share one classifier's rows
        for i, run in enumerate(todo):
            mode, n = train_size(run, info)
            batch_size = max(2, min(cfg.batch_size, n // parts))  # a tiny set trains
            spec = {"name": run.name, "mode": mode, "train_images": n, "batch_size": batch_size,
                    "shuffle_buffer": shuffle_buffer(n // parts, batch_size, image_bytes),
                    "held": held(-(-n // parts), image_bytes), "rank": 0, "seed": run.seed}
            if run.real_per_class and not held(int(sum(info.counts["train"])), image_bytes):
                raise ValueError(f"downstream run {run.name!r}: a random subset of a real train split over "
                                 f"{HOLD_BYTES >> 20} MiB decoded is not supported (it is drawn from the whole split)")
            if spec["held"]:  # each worker reads its rows itself: no Ray Data execution (see read_held)
                spec["files"] = parquet_files(run.shards) if run.shards else []
                spec["real"] = {"source": data.source, "root": root, "split": "train"} if run.real else None
                if run.real and run.real_per_class:
                    spec["real"] |= {"per_class": run.real_per_class, "subset_seed": seed + run.seed}
            else:
                datasets[run.name] = build_dataset(run, data, info, seed + i)[0]
            specs.append(spec)
        if by_runs:
            for spec, rank in zip(specs, deal([s["train_images"] for s in specs], workers)):
                spec["rank"] = rank
        config = {
            "runs": specs, "model": cfg.model, "num_classes": info.num_classes,
            "in_channels": 1 if info.mode == "L" else 3, "image_size": max(info.size), "epochs": cfg.epochs,
            "lr": cfg.lr, "use_gpu": cfg.use_gpu, "seed": seed, "progress": None, "parallel": cfg.parallel,
            "augment": cfg.augment, "flip": cfg.flip, "cutmix": cfg.cutmix,
            "report_every": max(1, math.ceil(cfg.epochs / cfg.checkpoints)),
            "image_mode": info.mode, "size": list(info.size),
            "test_held": {"source": data.source, "root": root, "split": "test"} if test_held else None,
        }
        if progress:
            from ray.util.queue import Queue

            config["progress"] = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config,
            scaling_config=scaling_config(cfg, ray.cluster_resources().get("CPU", 0), workers),
            run_config=RunConfig(
                storage_path=storage_path, name=name, storage_filesystem=storage_filesystem,
                checkpoint_config=CheckpointConfig(num_to_keep=1),  # the latest: ~90 MB for a resnet18
            ),
            datasets=datasets,
            # the test set is whole on every worker; one worker needs no split (a split's coordinator actor
            # per dataset costs a process start each: seconds on 2 cores)
            dataset_config=DataConfig(datasets_to_split=[s["name"] for s in specs if not s["held"]]
                                      if parts > 1 else []),
        )
        total = sum(s["train_images"] * (cfg.epochs - before.get(s["name"], {}).get("epochs", 0)) for s in specs)
        with _poll_every(POLL_SECONDS):
            result = _fit_with_bar(trainer, config["progress"], total, progress)
        if config["progress"] is not None:
            config["progress"].shutdown()
        done = _done(result)
    out = {}
    for run in runs:
        r = done[run.name]
        trained = r["epochs"] - r["resumed_from"] if run.name in {t.name for t in todo} else 0
        out[run.name] = {
            "accuracy": float(r["accuracy"]), "test_counts": r.get("test_counts"), "epochs": int(r["epochs"]),
            "train_images": int(r["train_images"]), "mode": r["mode"], "held": r.get("held"),
            "history": [dict(h) for h in r["history"]],
            "resumed_from": int(r["resumed_from"]) if trained else int(r["epochs"]), "epochs_trained": int(trained),
            "seed": r.get("seed", seed + run.seed),
        }
    return out


def train_and_evaluate(train: TrainSet, data, info, cfg: DownstreamConfig, storage_path: str, **kwargs) -> dict:
    """One classifier: :func:`train_and_evaluate_many` with a single run, named ``train.name`` in storage too.
    ``resumed_from`` is the checkpoint epoch this call started from (0 = a fresh run) and ``epochs_trained`` the
    epochs it ran; a run that already reached ``cfg.epochs`` is read back without starting a worker."""
    return train_and_evaluate_many([train], data, info, cfg, storage_path, train.name, **kwargs)[train.name]
