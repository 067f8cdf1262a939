"""Real-Fake (paper 002): MMD, LoRA on the denoiser, fine-tuning on a real local Ray Train, resume, the adapter
loaded by path, and ``factory run`` with a ``finetune`` recipe.

Every Ray Train start costs tens of seconds on the shared 2 cores, so one module fixture runs ``factory run``
once (its fine-tune is the first Ray Train run) and the resume test continues that same run.
"""

import itertools
import json
import math
import os

import pytest
import torch
import yaml

from factory.backbones import load_backbone, load_features
from factory.random_models import build_components, build_features_model, save_pipeline
from factory.cli import main
from factory.config import from_dict
from factory.data import load_real
from factory.realfake import (ADAPTER_FILES, ATTENTION_TARGETS, MARKER, add_lora, finetune, lora_parameters,
                              loss_terms, median_bandwidths, mmd2)
from factory.sampler import sample

FINETUNE = {"rank": 2, "steps": 2, "checkpoint_every": 1, "batch_size": 8, "lr": 1e-2, "num_workers": 2}
JOB = {
    "name": "rf",
    "seed": 1,
    "data": {"source": "digits", "classes": ["3", "8"]},
    "sampling": {"steps": 4, "shard_size": 6},
    "executor": {"num_actors": [1, 1]},
    "output": {"formats": ["parquet"]},
    "recipes": {"base": {"cfg_scale": 2.0, "images_per_class": 6},
                "rf": {"cfg_scale": 2.0, "images_per_class": 6, "init_strength": 0.75, "finetune": FINETUNE}},
}


# --- MMD ------------------------------------------------------------------------------------------


def _brute_mmd2(x, y, bandwidths):
    def k(a, b):
        return sum(math.exp(-sum((p - q) ** 2 for p, q in zip(a, b)) / (2 * s)) for s in bandwidths) / len(bandwidths)

    x, y = x.tolist(), y.tolist()
    mean = lambda u, v: sum(k(a, b) for a, b in itertools.product(u, v)) / (len(u) * len(v))  # noqa: E731
    return mean(x, x) + mean(y, y) - 2 * mean(x, y)


def test_mmd_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64) + 0.5
    for bw in ([0.5, 2.0], [1.0]):
        assert float(mmd2(x, y, bw)) == pytest.approx(_brute_mmd2(x, y, bw), abs=1e-6)
    # default bandwidths: multiples of the median pairwise squared distance of y
    d = [sum((p - q) ** 2 for p, q in zip(a, b)) for i, a in enumerate(y.tolist()) for j, b in enumerate(y.tolist())
         if i != j]
    med = sorted(d)[(len(d) - 1) // 2]  # torch.median: the lower middle
    assert median_bandwidths(y) == pytest.approx([0.5 * med, med, 2 * med])
    assert float(mmd2(x, y)) == pytest.approx(_brute_mmd2(x, y, [0.5 * med, med, 2 * med]), abs=1e-6)
    assert float(mmd2(y, y)) == pytest.approx(0.0, abs=1e-6)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mmd2(xr, y), xr)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# --- LoRA on the denoiser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    train = load_real("digits", "train")
    return train, torch.from_numpy(train.to_float()), torch.from_numpy(train.labels)


def test_lora_trains_only_the_adapter_and_lowers_the_loss(digits):
    _, images, labels = digits
    backbone, features = load_backbone("tiny", "digits", (8, 8)), load_features("cnn", "digits")
    base = {k: v.clone() for k, v in backbone.unet.state_dict().items()}
    model = add_lora(backbone.unet, rank=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # the digits UNet has no attention: its ResNet convolutions are adapted
    assert any("resnets.0.conv1.lora_A" in n for n in trainable)
    params = lora_parameters(model)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-2)
    x, y = images[:32], labels[:32]
    with torch.no_grad():
        real = features(x)
    losses = []
    for _ in range(8):  # one fixed batch, t and noise: the loss must fall
        terms = loss_terms(backbone, features, x, y, real, torch.Generator().manual_seed(0), mmd_weight=0.05)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
        assert terms["mmd"].item() >= 0 and math.isfinite(terms["simple"].item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    for key, value in model.get_base_model().state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, base[key.replace(".base_layer", "")]), key


def _ddp_gradients(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One DDP worker: LoRA on the digits UNet, the loss on this rank's own batch, gradients saved."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    backbone, features, model, x, y, gen = _lora_case(rank)
    backbone.wrap_denoiser(DistributedDataParallel(backbone.unet))
    with torch.no_grad():
        real = features(x)
    loss_terms(backbone, features, x, y, real, gen, mmd_weight=0.05)["loss"].backward()
    torch.save([p.grad for p in lora_parameters(model)], os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def _lora_case(rank: int):
    train = load_real("digits", "train")
    images, labels = torch.from_numpy(train.to_float()), torch.from_numpy(train.labels)
    backbone, features = load_backbone("tiny", "digits", (8, 8)), load_features("cnn", "digits")
    model = add_lora(backbone.unet, rank=2, seed=0)
    x, y = images[rank * 8:(rank + 1) * 8], labels[rank * 8:(rank + 1) * 8]
    return backbone, features, model, x, y, torch.Generator().manual_seed(rank)


@pytest.mark.integration
def test_ddp_through_wrap_denoiser_averages_the_workers_gradients(tmp_path):
    """What the Ray Train loop relies on: predict runs through the DDP wrapper, so each worker ends its backward
    with the mean of both workers' LoRA gradients (a forward that bypassed DDP would keep its own)."""
    torch.multiprocessing.spawn(_ddp_gradients, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    synced = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    alone = []
    for rank in range(2):
        backbone, features, model, x, y, gen = _lora_case(rank)
        with torch.no_grad():
            real = features(x)
        loss_terms(backbone, features, x, y, real, gen, mmd_weight=0.05)["loss"].backward()
        alone.append([p.grad for p in lora_parameters(model)])
    assert any(g.abs().sum() > 0 for g in alone[0])
    assert any(not torch.allclose(a, b) for a, b in zip(*alone))  # the two batches disagree
    for g0, g1, a, b in zip(*synced, *alone):
        assert torch.equal(g0, g1)
        torch.testing.assert_close(g0, (a + b) / 2, rtol=1e-4, atol=1e-6)


def test_sd15_attention_lora_saved_and_loaded_by_path(tmp_path, digits):
    """The tiny random sd15 (as tests/test_backbones.py builds it): LoRA on to_q/k/v/out, one step, saved, loaded."""
    _, images, labels = digits
    comps = build_components("sd15", "tiny", seed=1)
    comps.pop("tiny_vae")
    save_pipeline(comps, tmp_path / "sd15")
    cnn, _ = build_features_model("cnn", "tiny", seed=2)
    cnn.save(tmp_path / "cnn")
    names = [str(i) for i in range(10)]
    opts = {"class_names": names, "mode": "L"}
    backbone = load_backbone("sd15", str(tmp_path / "sd15"), (8, 8), **opts)
    features = load_features("cnn", str(tmp_path / "cnn"))
    model = add_lora(backbone.unet, rank=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(any(f".{t}.lora_" in n for t in ATTENTION_TARGETS) for n in trainable)
    opt = torch.optim.Adam(lora_parameters(model), lr=5e-2)
    x, y = images[:4], labels[:4]
    terms = loss_terms(backbone, features, x, y, features(x).detach(), torch.Generator().manual_seed(0),
                       mmd_weight=0.05, p_uncond=0.5)
    terms["loss"].backward()
    opt.step()
    model.save_pretrained(str(tmp_path / "lora"))
    plain = load_backbone("sd15", str(tmp_path / "sd15"), (8, 8), **opts)
    tuned = load_backbone("sd15", str(tmp_path / "sd15"), (8, 8), lora=str(tmp_path / "lora"), **opts)
    assert not any(n for n, _ in tuned.unet.named_modules() if "lora" in n)  # merged: plain layers again
    out = [sample(b, b.scheduler, torch.tensor([1, 2]), torch.Generator().manual_seed(0), 2, cfg_scale=2.0).images
           for b in (plain, tuned)]
    assert out[0].shape == out[1].shape == (2, 1, 8, 8)
    assert not torch.equal(out[0], out[1])
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter folder"):
        load_backbone("sd15", str(tmp_path / "sd15"), (8, 8), lora=str(tmp_path), **opts)


# --- Ray Train and factory run ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def realfake_run(local_ray, tmp_path_factory):
    """``factory run`` of a base and a Real-Fake recipe: fine-tunes (2 Ray Train workers), then samples."""
    tmp = tmp_path_factory.mktemp("realfake")
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(JOB))
    out = str(tmp / "out")
    assert main(["run", str(path), "--output", out, "--quiet"]) == 0
    return str(path), out


def test_run_finetunes_then_samples_with_the_adapter(realfake_run):
    _, out = realfake_run
    lora = os.path.join(out, "rf", "lora")
    assert sorted(os.listdir(lora)) == sorted([*ADAPTER_FILES, MARKER])
    assert not os.path.exists(os.path.join(out, "base", "lora"))
    marker = json.load(open(os.path.join(lora, MARKER)))
    assert marker["steps"] == 2 and marker["resumed_from"] == 0 and marker["steps_trained"] == 2
    assert [h["step"] for h in marker["history"]] == [1, 2]
    assert all(math.isfinite(h["loss"]) and h["mmd"] >= 0 for h in marker["history"])
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["finetune"]["rf"]["steps_trained"] == 2 and run["wall_seconds"]["finetune"] > 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["rf"]["num_images"] == metrics["base"]["num_images"] == 12
    # the adapter the run wrote changes what the sampler makes
    plain = load_backbone("tiny", "digits", (8, 8))
    tuned = load_backbone("tiny", "digits", (8, 8), lora=lora)
    a, b = (sample(m, m.scheduler, torch.tensor([3, 8]), torch.Generator().manual_seed(0), 4, cfg_scale=2.0).images
            for m in (plain, tuned))
    assert not torch.equal(a, b)


def test_finetune_resumes_and_a_rerun_trains_nothing(realfake_run, digits):
    path, out = realfake_run
    train, _, _ = digits
    lora = os.path.join(out, "rf", "lora")
    more = {**JOB, "recipes": {**JOB["recipes"], "rf": {**JOB["recipes"]["rf"], "finetune": {**FINETUNE, "steps": 3}}}}
    cfg = from_dict(more)
    resumed = finetune(cfg, "rf", train, lora, os.path.join(out, "_train"))
    assert resumed["resumed_from"] == 2 and resumed["steps_trained"] == 1 and resumed["steps"] == 3
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3]
    assert json.load(open(os.path.join(lora, MARKER)))["steps"] == 3
    again = finetune(cfg, "rf", train, lora, os.path.join(out, "_train"))  # complete: read back, nothing runs
    assert again["steps_trained"] == 0 and again["steps"] == 3
    # the run itself: every shard is complete, so no fine-tune starts and no shard is made
    assert main(["run", path, "--output", out, "--quiet"]) == 0
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["shards"]["made"] == 0 and "finetune" not in run
