"""The embedded backbone: config, save/load round trips, packaged digits checkpoints, size conversion."""

import json
import math

import pytest
import torch

from factory import embedded as E
from factory.data import DataError, load_real


def _tiny_unet(sample_size=8):
    torch.manual_seed(0)
    cfg = E.tiny_unet_config(sample_size, 1, 10, channels=(8, 16), layers_per_block=1)
    return E.build_unet(cfg).eval()


def test_tiny_unet_forward_with_null_class():
    unet = _tiny_unet()
    assert unet.config.num_class_embeds == 11 and E.null_class(unet) == 10
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0, 500, 999])
    labels = torch.tensor([0, 9, E.null_class(unet)])
    with torch.no_grad():
        out = unet(x, t, class_labels=labels).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    with torch.no_grad():  # the class label actually conditions the output
        other = unet(x, t, class_labels=torch.tensor([1, 2, 3])).sample
    assert not torch.allclose(out, other)


def test_save_and_load_roundtrip(tmp_path):
    from diffusers import DDPMScheduler

    unet = _tiny_unet()
    unet.save_pretrained(str(tmp_path / "unet"))
    DDPMScheduler(**E.scheduler_config()).save_pretrained(str(tmp_path / "scheduler"))
    cnn = E.FeatureCNN(1, 10, (8, 8), work_size=16, width=8, feat_dim=16).eval()
    cnn.save(tmp_path / "cnn")
    assert json.loads((tmp_path / "cnn" / "config.json").read_text())["feat_dim"] == 16

    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([10, 700])
    y = torch.tensor([3, 10])
    for src in (tmp_path, tmp_path / "unet"):  # a checkpoint root or the part's own folder
        loaded = E.load_unet(src)
        with torch.no_grad():
            assert torch.equal(unet(x, t, class_labels=y).sample, loaded(x, t, class_labels=y).sample)
    cnn2 = E.load_cnn(tmp_path)
    with torch.no_grad():
        assert torch.equal(cnn(x), cnn2(x)) and cnn2(x).shape == (2, 16)
        assert cnn2.classify(x).shape == (2, 10)
    sched = E.load_scheduler(tmp_path)
    assert type(sched).__name__ == "DDIMScheduler"
    assert sched.config.beta_schedule == "squaredcos_cap_v2"
    assert type(E.load_scheduler(tmp_path, "ddpm")).__name__ == "DDPMScheduler"


def test_feature_cnn_is_differentiable():
    cnn = E.FeatureCNN(1, 10, (8, 8), width=8, feat_dim=16)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    cnn(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("real,model", [((8, 8), 8), ((8, 8), 16), ((28, 28), 32), ((28, 28), 16)])
def test_size_round_trip(real, model):
    x = (torch.rand(2, 1, *real) * 2 - 1).requires_grad_(True)
    m = E.to_model_space(x, model)
    assert m.shape == (2, 1, model, model)
    back = E.to_real_size(m, real)
    assert back.shape == x.shape
    back.sum().backward()
    assert x.grad is not None
    if model == real[0]:
        assert torch.equal(back, x)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope"
    for loader in (E.load_unet, E.load_scheduler, E.load_cnn):
        with pytest.raises(ValueError, match="nope"):
            loader(missing)
    with pytest.raises(ValueError, match="no_such_dataset"):
        E.load_unet("no_such_dataset")


def test_packaged_digits_checkpoints():
    unet = E.load_unet("digits")
    sched = E.load_scheduler("digits")
    cnn = E.load_cnn("digits")
    assert unet.config.num_class_embeds == 11
    assert sched.config.prediction_type == "epsilon"
    s = unet.config.sample_size
    with torch.no_grad():
        out = unet(torch.randn(2, 1, s, s), torch.tensor([5, 900]), class_labels=torch.tensor([4, 10])).sample
    assert out.shape == (2, 1, s, s)

    test = load_real("digits", "test")
    x = torch.from_numpy(test.to_float())
    assert cnn(x[:4]).shape == (4, cnn.feat_dim)
    acc = E.accuracy(cnn, x, torch.from_numpy(test.labels))
    assert acc >= 0.95


def test_training_is_deterministic_given_the_seed(tmp_path):
    from safetensors.torch import load_file

    def run(name, seed):
        out = tmp_path / name
        E.train_unet("digits", out, steps=3, seed=seed, batch_size=8, log_every=100,
                     unet_kwargs={"channels": (8, 16), "layers_per_block": 1, "attention": False})
        E.train_cnn("digits", out, epochs=1, seed=seed, batch_size=32, max_train=64,
                    cnn_kwargs={"work_size": 8, "width": 8, "feat_dim": 16})
        return (load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")),
                load_file(str(out / "cnn" / "model.safetensors")))

    a, b, c = run("a", 0), run("b", 0), run("c", 1)
    for part in range(2):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
        assert not all(torch.equal(a[part][k], c[part][k]) for k in a[part])
    assert E.load_unet(tmp_path / "a").config.num_class_embeds == 11


def test_packaged_fashion_mnist_checkpoints(system_package):
    if not (E.WEIGHTS_DIR / "fashion_mnist" / "unet").is_dir():
        pytest.skip("no packaged fashion_mnist checkpoints")
    try:
        test = load_real("fashion_mnist", "test")
    except DataError as e:
        assert "dataset-fashion-mnist" in str(e)
        system_package("dataset-fashion-mnist", False, "the CNN is judged on Fashion-MNIST's test split")
    unet, cnn = E.load_unet("fashion_mnist"), E.load_cnn("fashion_mnist")
    assert unet.config.num_class_embeds == 11 and unet.config.sample_size == 28
    assert E.load_scheduler("fashion_mnist").config.prediction_type == "epsilon"
    x, y = torch.from_numpy(test.to_float()[:2000]), torch.from_numpy(test.labels[:2000])
    assert cnn(x[:2]).shape == (2, 128)
    assert E.accuracy(cnn, x, y) >= 0.85


def _coloured_folder(root, size=12, train_per_class=10, test_per_class=4):
    """A 3-class RGB image folder with train/ and test/ splits: digits 0-2, resized and tinted per class."""
    import numpy as np
    from PIL import Image

    digits = load_real("digits", "train")
    tints = [(255, 80, 80), (80, 255, 80), (80, 80, 255)]
    for c, name in enumerate(["zero", "one", "two"]):
        imgs = digits.of_class(c)[:train_per_class + test_per_class]
        for i, img in enumerate(imgs):
            split = "train" if i < train_per_class else "test"
            grey = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
            rgb = (grey[..., None] * np.asarray(tints[c], dtype=np.float32)).astype(np.uint8)
            (root / split / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb, "RGB").save(root / split / name / f"{i:03d}.png")


def test_warmup_cosine_ramps_to_the_base_rate_then_decays_to_five_percent():
    from factory.embedded import warmup_cosine

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    schedule, rates = warmup_cosine(opt, total=30, warmup=4), []
    for _ in range(30):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    for step, rate in enumerate(rates):
        frac = (step - 4) / 26
        want = 2e-3 * (step + 1) / 4 if step < 4 else 2e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        assert rate == pytest.approx(want, rel=1e-9), step
    assert rates[3] == pytest.approx(2e-3) and rates[-1] < 0.06 * 2e-3


def test_recipe_for_sizes_the_models_from_the_data():
    small, mid, large = E.recipe_for((12, 12), 30), E.recipe_for((28, 28), 8000), E.recipe_for((96, 64), 500)
    assert (small["sample_size"], mid["sample_size"], large["sample_size"]) == (12, 28, 32)
    assert small["unet"] == E.RECIPES["digits"]["unet"] and mid["unet"] == E.RECIPES["fashion_mnist"]["unet"]
    assert (small["cnn_epochs"], mid["cnn_epochs"], large["cnn_epochs"]) == (60, 12, 60)
    assert not mid["cnn_aug"]["flip"] and E.recipe_for((28, 28), 8000, flip=True)["cnn_aug"]["flip"]


def test_train_embedded_on_your_own_folder_then_a_job_samples_and_scores_with_it(local_ray, tmp_path):
    """Bring your own data: train-embedded on an RGB image folder, then `factory run` with its checkpoints."""
    import os

    import pyarrow.parquet as pq
    import yaml

    from factory.cli import main
    from factory.data import decode_image

    data, ckpt = tmp_path / "data", tmp_path / "ckpt"
    _coloured_folder(data)
    args = ["train-embedded", "--source", "imagefolder", "--root", str(data), "--out", str(ckpt), "--quick",
            "--threads", "1"]
    assert main(args) == 0
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "data"]  # no .partial left behind
    training = json.loads((ckpt / "training.json").read_text())
    assert training["class_names"] == ["one", "two", "zero"] and training["mode"] == "RGB"
    assert training["size"] == [12, 12] and training["cnn"]["test_acc"] is not None
    unet = E.load_unet(ckpt)
    assert (unet.config.in_channels, unet.config.num_class_embeds, unet.config.sample_size) == (3, 4, 12)
    assert E.load_cnn(ckpt).config["num_classes"] == 3

    job = {"name": "own", "seed": 0, "data": {"source": "imagefolder", "root": str(data)},
           "backbone": {"name": "tiny", "checkpoint": str(ckpt)}, "features": {"name": "cnn", "checkpoint": str(ckpt)},
           "sampling": {"steps": 3, "shard_size": 4}, "executor": {"num_actors": [1, 1]},
           "eval": {"k": 2}, "recipes": {"cfg": {"cfg_scale": 2.0, "images_per_class": 4}}}
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(job))
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "own.yaml"), "--output", str(out), "--quiet"]) == 0
    table = pq.read_table(str(out / "cfg" / "parquet"))
    assert table.num_rows == 12 and sorted(set(table.column("class_name").to_pylist())) == ["one", "two", "zero"]
    img = decode_image(table.column("image")[0].as_py(), "shard image")
    assert img.mode == "RGB" and img.size == (12, 12)
    assert json.loads((out / "metrics.json").read_text())["cfg"]["num_images"] == 12


def test_train_embedded_refuses_bad_input_before_writing(tmp_path, capsys):
    from factory.cli import main

    assert main(["train-embedded", "--source", "imagefolder", "--root", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "ckpt")]) != 0
    assert "image folder not found" in capsys.readouterr().err
    assert main(["train-embedded", "--source", "parquet", "--root", str(tmp_path)]) != 0
    assert "--out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_flat_folder_has_no_test_split_to_report(tmp_path):
    _coloured_folder(tmp_path / "split")
    flat = tmp_path / "split" / "train"  # class folders only: its "test" split would be these images again
    assert E._test_split("imagefolder", str(flat)) is None
    assert len(E._test_split("imagefolder", str(tmp_path / "split")).labels) == 12
