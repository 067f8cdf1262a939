"""The embedded backbone: config, save/load round trips, packaged digits checkpoints, size conversion."""

import json

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
