"""Downstream classifier on a real local Ray Train (2 CPU workers on 2 CPUs), on the 8x8 digits, every set
streamed by Ray Data.

The real-only run is trained in two calls (1 epoch, then resumed to 2) and called a third time: the three
calls share one module fixture, since every Ray Train start costs seconds on 2 cores.
"""

import io
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from factory.config import DataConfig, DownstreamConfig
from factory.data import load_real
from factory.downstream import (TrainSet, build_dataset, held, held_batches, parquet_files, read_held, real_dataset,
                                resnet, scaling_config, shuffle_buffer, train_and_evaluate, train_and_evaluate_many)
from factory import downstream
from factory.shards import ShardSink

# Chance is 0.1. Measured with the ConvNet (seed 0, 2 workers, streamed): real 0.83 after epoch 1, 0.92 after
# the resumed epoch 2. A loop that mislabels, splits classes by worker or does not learn fails.
MIN_ACCURACY = 0.7
DIGITS = DataConfig(source="digits")


def _cfg(epochs: int, **kw) -> DownstreamConfig:
    # 1347 images, 21 steps an epoch per worker; lr 0.02 (not the default 0.05) suits so few steps. The ConvNet
    # (a quarter of the 8x8 ResNet-18's time a step): these tests are about the training loop, not the model
    # (the quickstart's ResNet-18 trains in tests/test_console.py)
    return DownstreamConfig(**{"enabled": True, "model": "convnet", "epochs": epochs, "batch_size": 32, "lr": 0.02,
                               "num_workers": 2, **kw})


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class RealInfo:
    """What the stage's ``RealInfo`` (factory.stages.references) tells of a real set: no images."""

    class_names: list
    size: tuple
    mode: str
    counts: dict

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _info(train, test) -> RealInfo:
    counts = {s: np.bincount(r.labels, minlength=10).tolist() for s, r in (("train", train), ("test", test))}
    return RealInfo(list(train.class_names), train.size, train.mode, counts)


@pytest.fixture(scope="module")
def digits():
    train, test = load_real("digits", "train"), load_real("digits", "test")
    return train, test, _info(train, test)


def _write_shards(sink: ShardSink, folder: str, real) -> None:
    """``real`` as our Parquet shards under ``<sink>/<folder>/parquet``: one class per shard, two per class."""
    for label, name in enumerate(real.class_names):
        for part, chunk in enumerate(np.array_split(real.of_class(label), 2)):
            records = [{"key": f"{name}-{part}-{i:04d}", "image": _png(a), "label": label, "class_name": name,
                        "seed": i} for i, a in enumerate(chunk)]
            sink.commit(folder, f"{name}-{part}", records, {})


@pytest.fixture(scope="module")
def shards(digits, tmp_path_factory):
    """The real digits train split written as our Parquet shards: (folder URI, files)."""
    sink = ShardSink(str(tmp_path_factory.mktemp("shards")), ["parquet"])
    _write_shards(sink, "cfg", digits[0])
    return f"{sink.root}/cfg/parquet", [sink.fs.unstrip_protocol(f) for f in sink.shard_files("cfg", "parquet")]


@pytest.fixture(scope="module")
def real_runs(local_ray, digits, tmp_path_factory):
    """One real-only run: 1 epoch, then resumed to 2 epochs, then called again once finished. Two CPU workers on
    the 2-CPU cluster: had they taken both CPUs, Ray Data's read tasks would wait forever (a hang here)."""
    _, _, info = digits
    storage = str(tmp_path_factory.mktemp("train_runs"))
    with pytest.MonkeyPatch.context() as mp:  # these stream every epoch, as a set above HOLD_BYTES does
        mp.setattr(downstream, "HOLD_BYTES", 0)
        runs = [train_and_evaluate(TrainSet("real", None, 0, True), DIGITS, info, _cfg(epochs), storage, seed=0)
                for epochs in (1, 2, 2)]
    return runs, os.path.join(storage, "real")


def test_resnet_stem_fits_the_input_size():
    small = resnet("resnet18", 10, 1, 8)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.in_channels == 1
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert small(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    # sized for 8x8: stages of 32 ... 256 channels, a quarter of the full ResNet-18's parameters
    assert small.conv1.out_channels == 32 and small.fc.in_features == 256
    assert sum(p.numel() for p in small.parameters()) < 3_000_000
    assert resnet("resnet18", 10, 1, 28).conv1.out_channels == 64
    large = resnet("resnet18", 5, 3, 64)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, torch.nn.MaxPool2d)
    assert large(torch.zeros(2, 3, 64, 64)).shape == (2, 5)
    gray = resnet("resnet18", 3, 1, 48)
    assert gray.conv1.in_channels == 1 and gray.conv1.stride == (2, 2)
    assert gray(torch.zeros(2, 1, 48, 48)).shape == (2, 3)
    with pytest.raises(ValueError, match="resnet18"):
        resnet("vgg11", 10, 1, 8)


def test_scaling_config_takes_use_gpu_and_leaves_a_cpu_to_ray_data():
    gpu = scaling_config(DownstreamConfig(num_workers=2, use_gpu=True), cluster_cpus=2)
    assert gpu.use_gpu and gpu.num_workers == 2 and gpu.num_gpus_per_worker == 1 and gpu.num_cpus_per_worker == 0
    cpu = scaling_config(DownstreamConfig(num_workers=2, use_gpu=False), cluster_cpus=2)
    assert not cpu.use_gpu and cpu.num_cpus_per_worker == 0.5  # 1 of the 2 CPUs stays with Ray Data
    assert scaling_config(DownstreamConfig(num_workers=2), cluster_cpus=16).num_cpus_per_worker == 1
    with pytest.raises(ValueError, match="need more than the cluster's 1 CPUs"):
        scaling_config(DownstreamConfig(num_workers=1), cluster_cpus=1)


def test_shuffle_buffer_holds_many_one_class_shards_within_a_bound():
    assert shuffle_buffer(1350, 32, 64) == 1350  # the quickstart: the whole set, every batch mixes classes
    assert shuffle_buffer(1_281_167, 128, 256 * 256 * 3) == (256 << 20) // (256 * 256 * 3)  # capped in bytes
    assert shuffle_buffer(100, 32, 64) == 256  # never below 8 batches


def test_a_small_split_is_held_a_large_one_streams():
    assert held(1350, 64)  # the quickstart's 8x8 digits: read once, not once per epoch
    assert not held(1_281_167, 256 * 256 * 3)  # ImageNet at 256 px streams every epoch
    assert held((256 << 20) // 3072, 3072) and not held((256 << 20) // 3072 + 1, 3072)  # the bound is in bytes


def test_held_epochs_are_seeded_permutations_in_whole_batches():
    labels = torch.arange(10)
    split = (labels.to(torch.uint8)[:, None, None].expand(10, 2, 2), labels)
    epoch = list(held_batches(split, 3, seed=1))
    assert [len(b["label"]) for b in epoch] == [3, 3, 3]  # drop_last, like the stream
    seen = torch.cat([b["label"] for b in epoch])
    assert len(set(seen.tolist())) == 9 and all((b["image"][:, 0, 0] == b["label"]).all() for b in epoch)
    again = torch.cat([b["label"] for b in held_batches(split, 3, seed=1)])
    other = torch.cat([b["label"] for b in held_batches(split, 3, seed=2)])
    assert torch.equal(seen, again) and not torch.equal(seen, other)


def test_a_held_split_is_read_by_each_worker_in_a_fixed_order(digits, shards):
    train, _, _ = digits
    folder, files = shards
    assert parquet_files(folder) == files == sorted(files) and parquet_files(files[:2]) == files[:2]
    whole = read_held(files, None, "L", (8, 8), 0, 1)
    assert whole[0].dtype == torch.uint8 and whole[0].shape == (1347, 8, 8)
    assert torch.equal(torch.bincount(whole[1]), torch.from_numpy(np.bincount(train.labels)))
    # two workers: every row once, alternating across file boundaries; the same rows on every call
    parts = [read_held(files, None, "L", (8, 8), r, 2) for r in (0, 1)]
    assert [len(p[1]) for p in parts] == [674, 673]
    assert torch.equal(parts[0][0], whole[0][0::2]) and torch.equal(parts[1][1], whole[1][1::2])
    again = read_held(files, None, "L", (8, 8), 1, 2)
    assert torch.equal(again[0], parts[1][0]) and torch.equal(again[1], parts[1][1])
    # mixed: the real train split follows the shards, continuing the alternation
    real = {"source": "digits", "root": None, "split": "train"}
    mixed = [read_held(files, real, "L", (8, 8), r, 2) for r in (0, 1)]
    assert sum(len(m[1]) for m in mixed) == 2 * 1347
    assert torch.equal(mixed[1][0][673:], torch.from_numpy(train.images[0::2]))
    with pytest.raises(ValueError, match="the real train images are L 8x8, the set's are RGB 8x8"):
        read_held([], real, "RGB", (8, 8), 0, 1)


def test_datasets_need_a_set_and_matching_images(local_ray, digits):
    _, _, info = digits
    with pytest.raises(ValueError, match="needs synthetic shards, the real train split or both"):
        build_dataset(TrainSet("x", None, 0, False), DIGITS, info)
    rgb = RealInfo(info.class_names, info.size, "RGB", info.counts)
    with pytest.raises(Exception, match="the real test images are L 8x8, the set's are RGB 8x8"):
        real_dataset(DIGITS, "test", rgb).take(1)


def test_real_splits_stream_from_parquet_and_from_ray_tasks(local_ray, digits, tmp_path):
    train, test, info = digits
    sink = ShardSink(str(tmp_path), ["parquet"])  # the prepared layout: <root>/train/parquet/, <root>/test/...
    _write_shards(sink, "test", test)
    parquet = DataConfig(source="parquet", root=str(tmp_path))
    for data in (parquet, DIGITS):
        labels = np.concatenate([b["label"] for b in real_dataset(data, "test", info).iter_batches(
            batch_format="numpy")])
        assert np.array_equal(np.bincount(labels, minlength=10), np.bincount(test.labels)), data.source
    batch = real_dataset(parquet, "test", info).take_batch(4, batch_format="numpy")
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 8, 8)


def test_real_only_training_beats_chance(real_runs):
    (_, result, _), _ = real_runs
    assert result["mode"] == "real" and result["train_images"] == 1347 and result["epochs"] == 2
    assert result["held"] is False  # the streamed path: a Ray Data execution per epoch
    assert result["accuracy"] > MIN_ACCURACY, result
    assert result["accuracy"] == result["history"][-1]["test_accuracy"]
    # counts per class from the streamed test split: every test image judged once
    assert result["test_counts"]["images"] == np.bincount(load_real("digits", "test").labels).tolist()
    assert sum(result["test_counts"]["correct"]) / 450 == result["accuracy"]
    assert result["history"][-1]["loss"] < result["history"][0]["loss"] < 2.3  # ln(10) = 2.30 at chance
    assert all(h["seconds"] > 0 for h in result["history"])  # each epoch's training time, for the log


def test_rerun_resumes_from_the_latest_checkpoint(real_runs):
    (first, resumed, _), _ = real_runs
    assert (first["epochs"], first["resumed_from"], first["epochs_trained"]) == (1, 0, 1)
    assert (resumed["epochs"], resumed["resumed_from"], resumed["epochs_trained"]) == (2, 1, 1)
    # epoch 1 comes from the checkpoint, not from training it again
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["history"][0]["loss"] == first["history"][0]["loss"]


def test_finished_run_is_read_back_without_training(real_runs):
    (_, resumed, again), run_dir = real_runs
    assert again["epochs_trained"] == 0 and again["resumed_from"] == 2
    assert {k: v for k, v in again.items() if k not in ("resumed_from", "epochs_trained")} == \
        {k: v for k, v in resumed.items() if k not in ("resumed_from", "epochs_trained")}
    checkpoints = [d for d in os.listdir(run_dir) if os.path.isdir(os.path.join(run_dir, d))]
    assert len(checkpoints) == 1, checkpoints  # num_to_keep=1: the latest only


def test_synthetic_only_then_a_second_classifier_in_the_same_trainer_storage(local_ray, digits, shards, tmp_path):
    _, _, info = digits
    folder, files = shards
    synthetic = TrainSet("synthetic", folder, 1347, False)
    first = train_and_evaluate_many([synthetic], DIGITS, info, _cfg(1), str(tmp_path), "group")
    result = first["synthetic"]
    assert result["mode"] == "synthetic" and result["train_images"] == 1347 and result["held"] is True
    assert [h["epoch"] for h in result["history"]] == [1] and result["resumed_from"] == 0
    assert result["accuracy"] > MIN_ACCURACY, result
    # a rerun that adds a classifier trains only the new one, in the same trainer's storage
    mixed = TrainSet("mixed", files, 1347, True)
    again = train_and_evaluate_many([synthetic, mixed], DIGITS, info, _cfg(1), str(tmp_path), "group")
    assert again["synthetic"]["epochs_trained"] == 0 and again["synthetic"]["history"] == result["history"]
    assert again["mixed"]["epochs_trained"] == 1 and again["mixed"]["mode"] == "mixed"
    assert again["mixed"]["train_images"] == 2 * 1347 and again["mixed"]["accuracy"] > MIN_ACCURACY
    assert os.listdir(tmp_path) == ["group"]
    with pytest.raises(ValueError, match="unique"):
        train_and_evaluate_many([mixed, mixed], DIGITS, info, _cfg(1), str(tmp_path), "g2")


def test_training_set_streams_files_in_a_new_order_each_epoch_and_mixes_classes(local_ray, digits, shards):
    train, _, info = digits
    ds, mode, n = build_dataset(TrainSet("synthetic", shards[0], 1347, False), DIGITS, info, seed=0)
    assert (mode, n) == ("synthetic", 1347)
    ds.context.execution_options.preserve_order = True  # only the file order can change between executions

    def labels(**kw):
        return np.concatenate([b["label"] for b in ds.iter_batches(batch_size=32, batch_format="numpy", **kw)])

    first, second = labels(), labels()  # two executions: two epochs
    assert np.array_equal(np.bincount(first), np.bincount(train.labels))
    assert not np.array_equal(first, second)  # the shards' file order is drawn anew per execution
    assert len(set(first[:64].tolist())) <= 2  # a shard holds one class: unmixed, a batch holds one or two
    # the local shuffle buffer the workers use mixes every class into the first batches
    mixed = labels(local_shuffle_buffer_size=shuffle_buffer(n, 32, 64), local_shuffle_seed=0)
    assert len(set(mixed[:64].tolist())) == 10
    both, mode, n = build_dataset(TrainSet("mixed", shards[1], 1347, True), DIGITS, info, seed=0)
    assert (mode, n) == ("mixed", 2 * 1347)
    assert np.array_equal(np.bincount(np.concatenate([b["label"] for b in both.iter_batches(batch_format="numpy")])),
                          2 * np.bincount(train.labels))


def test_deal_gives_the_longest_runs_first_to_the_least_loaded_worker():
    assert downstream.deal([1347, 1347, 2694], 2) == [1, 1, 0]
    assert downstream.deal([10, 10, 10, 10, 10], 2) == [0, 1, 0, 1, 0]
    assert downstream.deal([5, 7], 4) == [1, 0]


def test_runs_dealt_to_two_workers_equal_one_worker_training_them_all_and_resume(local_ray, digits, shards, tmp_path):
    """``parallel: runs``: two workers train whole classifiers (the mixed set on one, synthetic and real on the
    other, which the first pads its reports for): each classifier is the one a single worker trains, and a
    longer rerun resumes every run from the merged checkpoint of both workers."""
    _, _, info = digits
    folder, files = shards
    runs = [TrainSet("synthetic", folder, 1347, False), TrainSet("real", None, 0, True),
            TrainSet("mixed", files, 1347, True)]
    alone = _cfg(1, num_workers=1)
    one = train_and_evaluate_many(runs, DIGITS, info, alone, str(tmp_path / "one"), "group")
    dealt = train_and_evaluate_many(runs, DIGITS, info, _cfg(1, parallel="runs"), str(tmp_path / "runs"), "group")
    for name in ("synthetic", "real", "mixed"):
        assert dealt[name]["test_counts"] == one[name]["test_counts"], name
        assert [h["loss"] for h in dealt[name]["history"]] == [h["loss"] for h in one[name]["history"]], name
    assert dealt["synthetic"]["accuracy"] > MIN_ACCURACY and dealt["mixed"]["train_images"] == 2 * 1347
    # each worker's latest checkpoint file holds the run it trained last (mixed on one, real on the other):
    # both continue from their epoch; synthetic's state was replaced by real's, so it trains again from 0
    longer = train_and_evaluate_many(runs, DIGITS, info, _cfg(2, parallel="runs"), str(tmp_path / "runs"), "group")
    for name, start in (("mixed", 1), ("real", 1), ("synthetic", 0)):
        r = longer[name]
        assert (r["epochs"], r["resumed_from"], r["epochs_trained"]) == (2, start, 2 - start), (name, r)
        assert (r["history"][0] == dealt[name]["history"][0]) == (start == 1), name


def test_the_fit_polls_its_workers_often_unless_the_user_said_otherwise(monkeypatch):
    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    monkeypatch.delenv(key, raising=False)
    with downstream._poll_every("0.5"):
        assert os.environ[key] == "0.5"
    assert key not in os.environ  # restored: only the fit's controller sees it
    monkeypatch.setenv(key, "3")
    with downstream._poll_every("0.5"):
        assert os.environ[key] == "3"
    assert os.environ[key] == "3"


def test_random_subset_draws_per_class_by_seed():
    from factory.downstream import random_subset

    labels = np.repeat(np.arange(3), [5, 2, 7])
    a, b, c = random_subset(labels, 3, 0), random_subset(labels, 3, 0), random_subset(labels, 3, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(labels[a]).tolist() == [3, 2, 3] and np.all(np.diff(a) > 0)


@pytest.mark.parametrize("size", [(8, 8), (28, 28), (12, 20), (64, 64)])
def test_convnet_fits_any_input_size(size):
    from factory.downstream import classifier

    net = classifier("convnet", 7, 3, size)
    assert net(torch.zeros(2, 3, *size)).shape == (2, 7)


def test_augment_is_seeded_and_cutmix_mixes_hard_labels():
    from factory.downstream import augment

    x, y = torch.rand(6, 1, 8, 8) * 2 - 1, torch.arange(6) % 3
    config = {"augment": "resized_crop", "flip": True, "cutmix": 1.0, "num_classes": 3, "image_size": 8}
    a = augment(x, y, config, torch.Generator().manual_seed(0))
    b = augment(x, y, config, torch.Generator().manual_seed(0))
    c = augment(x, y, config, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert a[0].shape == x.shape and a[1].shape == (6, 3)  # CutMix: class probabilities
    assert torch.allclose(a[1].sum(1), torch.ones(6)) and (a[1] > 0).sum(1).max() <= 2
    crop, labels = augment(x, y, {"image_size": 8}, torch.Generator().manual_seed(0))  # the default: crop only
    assert torch.equal(labels, y) and crop.shape == x.shape
