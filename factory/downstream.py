"""Downstream classifier: a torchvision ResNet trained on Ray Train, judged on the real test split.

The training set is synthetic (the factory's Parquet shards), real (a ``RealSet``) or both ("mixed"); it
becomes one Ray Dataset of ``{"image": uint8 (H, W[, 3]), "label": int64}`` rows that Ray Train splits
across its workers. Several classifiers (one per recipe and mode, and real) train one after another in
one Ray Train run, so its start-up is paid once. Each epoch ends with ``ray.train.report`` and a
checkpoint (model, optimizer, epoch, history, finished results) under ``<storage_path>/<name>``; a rerun
with the same storage path and name resumes from the latest checkpoint (Ray Train V2 reloads the run's
snapshot and ``ray.train.get_checkpoint()`` hands it to the workers), and classifiers that already
reached their epochs are read back without training.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from factory.config import DownstreamConfig
from factory.data import RealSet, decode_image

RESNETS = ("resnet18", "resnet34", "resnet50")
CHECKPOINT_FILE = "state.pt"
DONE_FILE = "done.json"  # beside the state in each checkpoint: the finished classifiers' results
BLOCK_BYTES = 16 << 20  # bytes of real images per Ray Data block
SMALL_SET_BYTES = 64 << 20  # training sets up to this many decoded bytes are built in memory on the driver


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


# --- data -----------------------------------------------------------------------------------------


def decode_png(batch: dict, mode: str, size: tuple[int, int]) -> dict:
    """``map_batches`` step: encoded images (PNG, JPEG or WebP; the Image struct or plain bytes) -> uint8 arrays
    (B, H, W[, 3]) in the test set's mode and size."""
    images = []
    for data in batch["image"]:
        img = decode_image(data, "downstream training shard").convert(mode)
        if img.size != (size[1], size[0]):
            raise ValueError(f"a synthetic image is {img.size[0]}x{img.size[1]}, the real test images are "
                             f"{size[1]}x{size[0]}")
        images.append(np.asarray(img, dtype=np.uint8))
    return {"image": np.stack(images), "label": batch["label"].astype(np.int64)}


def _parquet_dataset(paths: list[str], mode: str, size: tuple[int, int]):
    import fsspec
    import ray
    from fsspec.implementations.local import LocalFileSystem
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = fsspec.core.url_to_fs(paths[0])
    kwargs = {}
    if not isinstance(fs, LocalFileSystem):  # any fsspec URI: hand pyarrow the fsspec filesystem
        kwargs["filesystem"] = PyFileSystem(FSSpecHandler(fs))
    paths = [fsspec.core.url_to_fs(p)[1] for p in paths]
    ds = ray.data.read_parquet(paths, columns=["image", "label"], **kwargs)
    return ds.map_batches(decode_png, fn_kwargs={"mode": mode, "size": size}, batch_format="numpy", batch_size=256)


def _real_dataset(real: RealSet):
    import ray

    blocks = max(1, math.ceil(real.images.nbytes / BLOCK_BYTES))  # from_items alone makes 200 tiny blocks
    rows = [{"image": im, "label": int(y)} for im, y in zip(real.images, real.labels)]
    return ray.data.from_items(rows, override_num_blocks=blocks)


def build_dataset(train_parquet: list[str] | None, real_train: RealSet | None, test: RealSet, seed: int = 0):
    """The training Ray Dataset (materialized), its mode ("synthetic" | "real" | "mixed") and its size.

    Decoding runs here, before the workers start: the uint8 images of a classifier's training set fit the
    object store, and the epochs then need no CPU beyond the workers' own (a Ray Data task left to run
    beside workers that hold every CPU waits forever). The rows are shuffled once here (seeded: a shard
    holds one class, and each worker must see every class), and the workers' local shuffle buffers mix
    them further each epoch.
    """
    parts, n = [], 0
    if train_parquet:
        import fsspec
        import pyarrow.parquet as pq

        for p in train_parquet:
            fs, path = fsspec.core.url_to_fs(p)
            with fs.open(path, "rb") as f:
                n += pq.ParquetFile(f).metadata.num_rows
        parts.append(_parquet_dataset(list(train_parquet), test.mode, test.size))
    if real_train is not None:
        if real_train.mode != test.mode or real_train.size != test.size:
            raise ValueError("real training and test images differ in mode or size")
        n += len(real_train.labels)
        parts.append(_real_dataset(real_train))
    if not parts:
        raise ValueError("downstream training needs train_parquet, real_train or both")
    mode = "mixed" if len(parts) == 2 else ("synthetic" if train_parquet else "real")
    if n * int(np.prod(test.size)) * (1 if test.mode == "L" else 3) <= SMALL_SET_BYTES:
        # A small set (the quickstart's: 1,350 8x8 images) is decoded and shuffled here, in memory: Ray
        # Data's all-to-all random_shuffle costs tens of seconds of tasks on 2 cores for a few hundred KB.
        return _small_dataset(train_parquet, real_train, test, seed), mode, n
    ds = parts[0].union(parts[1]) if len(parts) == 2 else parts[0]
    return ds.random_shuffle(seed=seed).materialize(), mode, n


def _small_dataset(train_parquet: list[str] | None, real_train: RealSet | None, test: RealSet, seed: int):
    """The training set decoded on the driver, shuffled by a seeded permutation, as one in-memory dataset."""
    import fsspec
    import pyarrow.parquet as pq
    import ray

    images, labels = [], []
    for p in train_parquet or []:
        fs, path = fsspec.core.url_to_fs(p)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["image", "label"])
        batch = decode_png({"image": table.column("image").to_pylist(),
                            "label": table.column("label").to_numpy()}, test.mode, test.size)
        images.append(batch["image"])
        labels.append(batch["label"])
    if real_train is not None:
        images.append(real_train.images)
        labels.append(real_train.labels.astype(np.int64))
    images, labels = np.concatenate(images), np.concatenate(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    return ray.data.from_items([{"image": images[i], "label": int(labels[i])} for i in order],
                               override_num_blocks=max(1, math.ceil(images.nbytes / BLOCK_BYTES))).materialize()


# --- training loop (runs on every Ray Train worker) ------------------------------------------------


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W[, 3]) -> float32 (B, C, H, W) in [-1, 1], like ``RealSet.to_float``."""
    x = images.float() / 127.5 - 1.0
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def _random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the reflect-padded batch back to its size."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    return torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])


def _evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, rank: int, world: int,
              device: torch.device) -> float:
    """Test accuracy, the test set split across the workers and the counts summed."""
    import torch.distributed as dist

    distributed = world > 1 and dist.is_initialized()
    if distributed:  # every worker judges rank 0's BatchNorm statistics
        for b in model.buffers():
            dist.broadcast(b, 0)
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        idx = np.arange(rank, len(labels), world)
        for s in range(0, len(idx), 512):
            j = idx[s:s + 512]
            x = torch.from_numpy(images[j]).to(device)
            correct[0] += (model(x).argmax(1).cpu() == torch.from_numpy(labels[j])).sum().item()
            correct[1] += len(j)
    if distributed:
        dist.all_reduce(correct)
    return float(correct[0] / correct[1])


def train_loop(config: dict) -> None:
    """The Ray Train worker loop over ``config["runs"]``, one classifier each, in order.

    Every epoch of every run ends with ``ray.train.report`` and a checkpoint of the run in progress
    (model, optimizer, epoch, history) plus the results of the runs already finished ("done"). On a
    resumed trainer, finished runs are skipped and the run in progress continues from its epoch.
    """
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not config["use_gpu"]:
        torch.set_num_threads(1)
    device = ray.train.torch.get_device()

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location=device, weights_only=False)
    done = dict(state["done"]) if state else {}
    for spec in config["runs"]:
        name = spec["name"]
        if name in done and done[name]["epochs"] >= config["epochs"]:
            continue
        resume = state if state and state["current"] == name else None
        _train_one(config, spec, resume, done, rank, world, device)


def _train_one(config: dict, spec: dict, state: dict | None, done: dict, rank: int, world: int,
               device: torch.device) -> None:
    """Train and judge one classifier; its result joins ``done`` (shared with the caller) at the last epoch."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint
    import torch.distributed as dist

    name = spec["name"]
    torch.manual_seed(config["seed"] + rank)
    gen = torch.Generator()
    net = resnet(config["model"], config["num_classes"], config["in_channels"], config["image_size"])
    model = ray.train.torch.prepare_model(net)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4)
    start, history = 0, []
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["epoch"], list(state["history"])

    epochs, batch_size = config["epochs"], spec["batch_size"]
    steps = max(1, spec["train_images"] // world // batch_size)  # per epoch and worker
    pad = max(1, config["image_size"] // 8)
    shard = ray.train.get_dataset_shard(name)
    for epoch in range(start, epochs):
        model.train()
        gen.manual_seed(config["seed"] + rank + 1000 * epoch)  # augmentation: the same on a resumed run
        loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, images
        batches = shard.iter_torch_batches(
            batch_size=batch_size, drop_last=True,  # equal steps on every worker; BatchNorm needs > 1 image
            local_shuffle_buffer_size=8 * batch_size,
            local_shuffle_seed=config["seed"] + 1000 * epoch + rank,
        )
        for i, batch in enumerate(batches):
            t = min(1.0, (epoch + i / steps) / epochs)  # cosine schedule over the whole run
            for group in opt.param_groups:
                group["lr"] = config["lr"] * 0.5 * (1.0 + math.cos(math.pi * t))
            x = _random_crop(to_float(batch["image"]), pad, gen)
            y = batch["label"]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum[0] += loss.item() * len(y)
            loss_sum[1] += len(y)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(loss_sum)
        accuracy = _evaluate(net, config["test_images"], config["test_labels"], rank, world, device)
        history.append({"epoch": epoch + 1, "loss": float(loss_sum[0] / max(loss_sum[1], 1)),
                        "test_accuracy": accuracy})
        if epoch + 1 == epochs:
            done[name] = {"accuracy": accuracy, "epochs": epochs, "history": list(history), "resumed_from": start,
                          "train_images": spec["train_images"], "mode": spec["mode"]}
        # The reported metrics stay small (Ray Train logs each report): the results travel in the checkpoint.
        metrics = {"current": name, "epoch": epoch + 1, "finished": len(done)}
        if rank == 0:  # every worker reports; rank 0 alone saves the (replicated) state
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                            "history": history, "current": name, "done": dict(done)},
                           os.path.join(d, CHECKPOINT_FILE))
                with open(os.path.join(d, DONE_FILE), "w") as f:
                    json.dump(done, f)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
            if config.get("progress") is not None:  # the driver's bar: one epoch of one classifier
                try:
                    config["progress"].put_nowait((name, epoch + 1, spec["train_images"]))
                except Exception:  # a full or lost queue costs the bar a tick, never the run
                    pass
        else:
            ray.train.report(metrics)


# --- driver ----------------------------------------------------------------------------------------


def _done(result) -> dict:
    """The finished classifiers of a Ray Train result: its latest checkpoint's done.json (older runs reported
    them in the metrics)."""
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            path = os.path.join(d, DONE_FILE)
            if os.path.exists(path):
                with open(path) as f:
                    return dict(json.load(f))
    return dict((result.metrics or {}).get("done") or {})


def _finished(path: str, storage_filesystem) -> dict:
    """The finished runs ("done") recorded by the trainer at ``path``; {} when there is none yet."""
    from ray.train import Result

    try:
        result = Result.from_path(path, storage_filesystem=storage_filesystem)
    except RuntimeError:  # no run there yet, or no checkpoint reported
        return {}
    return _done(result)


def _fit_with_bar(trainer, queue, total: int, progress: bool):
    """``trainer.fit()`` (on this thread: Ray Train handles signals) while a thread moves a bar over the
    images trained (epochs x set size), fed through ``queue`` by the rank-0 worker."""
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


def train_and_evaluate_many(
    runs: list[tuple[str, list[str] | None, RealSet | None]],
    test: RealSet,
    cfg: DownstreamConfig,
    storage_path: str,
    name: str,
    seed: int = 0,
    storage_filesystem=None,
    progress: bool = False,
) -> dict[str, dict]:
    """Train one classifier per ``(run name, train_parquet, real_train)`` in ONE Ray Train run.

    One worker group, started once, trains them in order (each from its own fresh initialisation with
    the same seed), so a run of many small sets pays Ray Train's start-up once. Checkpoints live under
    ``<storage_path>/<name>``; a rerun skips the finished classifiers and resumes the one in progress.
    Returns run name -> ``{"accuracy", "epochs", "train_images", "mode", "history", "resumed_from",
    "epochs_trained"}``, where ``epochs_trained`` counts the epochs this call ran (0: read back).
    ``progress``: a bar over the images to train (count, images/s, ETA), fed by the rank-0 worker.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    names = [r[0] for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"downstream run names must be unique, got {names}")
    if storage_filesystem is None and "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)
    before = _finished(f"{storage_path.rstrip('/')}/{name}", storage_filesystem)
    todo = [r for r in runs if before.get(r[0], {}).get("epochs", 0) < cfg.epochs]
    done = dict(before)
    if todo:
        datasets, specs = {}, []
        for run_name, files, real in todo:
            ds, mode, n = build_dataset(files, real, test, seed)
            datasets[run_name] = ds
            specs.append({"name": run_name, "mode": mode, "train_images": n,
                          "batch_size": max(2, min(cfg.batch_size, n // cfg.num_workers))})  # a tiny set trains
        config = {
            "runs": specs, "model": cfg.model, "num_classes": test.num_classes,
            "in_channels": 1 if test.mode == "L" else 3, "image_size": max(test.size), "epochs": cfg.epochs,
            "lr": cfg.lr, "use_gpu": cfg.use_gpu, "seed": seed,
            "test_images": test.to_float(), "test_labels": test.labels, "progress": None,
        }
        if progress:
            from ray.util.queue import Queue

            config["progress"] = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
            run_config=RunConfig(
                storage_path=storage_path, name=name, storage_filesystem=storage_filesystem,
                checkpoint_config=CheckpointConfig(num_to_keep=1),  # the latest: ~90 MB for a resnet18
            ),
            datasets=datasets,
        )
        total = sum(s["train_images"] * (cfg.epochs - before.get(s["name"], {}).get("epochs", 0)) for s in specs)
        result = _fit_with_bar(trainer, config["progress"], total, progress)
        if config["progress"] is not None:
            config["progress"].shutdown()
        done = _done(result)
    out = {}
    for run_name, _, _ in runs:
        r = done[run_name]
        trained = r["epochs"] - r["resumed_from"] if run_name in {t[0] for t in todo} else 0
        out[run_name] = {
            "accuracy": float(r["accuracy"]), "epochs": int(r["epochs"]), "train_images": int(r["train_images"]),
            "mode": r["mode"], "history": [dict(h) for h in r["history"]],
            "resumed_from": int(r["resumed_from"]) if trained else int(r["epochs"]), "epochs_trained": int(trained),
        }
    return out


def train_and_evaluate(train_parquet: list[str] | None, real_train: RealSet | None, test: RealSet,
                       cfg: DownstreamConfig, storage_path: str, name: str, **kwargs) -> dict:
    """Train ``cfg.model`` on Ray Train under ``<storage_path>/<name>`` (resuming it), judge it on ``test``.

    One classifier: :func:`train_and_evaluate_many` with a single run. ``resumed_from`` is the checkpoint
    epoch this call started from (0 = a fresh run) and ``epochs_trained`` the epochs it ran. A run that
    already reached ``cfg.epochs`` is read back from storage without building a dataset or starting a
    worker (``epochs_trained`` = 0).
    """
    return train_and_evaluate_many([(name, train_parquet, real_train)], test, cfg, storage_path, name, **kwargs)[name]
