"""The embedded backbone: tiny class-conditional diffusion UNets and feature CNNs trained by this project.

Checkpoints for the embedded real sets live in ``factory/weights/<dataset>/``::

    unet/       UNet2DModel.save_pretrained (config.json + diffusion_pytorch_model.safetensors)
    scheduler/  DDPMScheduler.save_pretrained (scheduler_config.json)
    cnn/        FeatureCNN: config.json + model.safetensors
    training.json  how they were trained (seed, steps, wall times, CNN test accuracy)

The UNet is conditioned through ``class_labels``; id ``num_classes`` is the NULL class used for
classifier-free guidance. It works at ``config["sample_size"]``, which may differ from the real set's
size: use :func:`to_model_space` / :func:`to_real_size` to convert. Everything is trained on the
train split only (``load_real(dataset, "train")``) and is deterministic given the seed.

Train with ``factory train-embedded --source digits`` (writes ``factory/weights/digits``); each folder's
training.json records exactly how its shipped checkpoints were made (the Fashion-MNIST UNet was
continued for a second phase with ``train_unet(..., init_from=...)``). Any other labelled set
(``--source imagefolder|parquet|webdataset --root URI --out DIR``) gets a recipe sized from its data
(:func:`recipe_for`); a job then names ``DIR`` as its ``backbone.checkpoint`` and ``features.checkpoint``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_DIR = Path(__file__).parent / "weights"

# Per-dataset training recipes (the CPU budget is ~10-15 minutes on 2 cores).
RECIPES: dict[str, dict] = {
    "digits": {
        "sample_size": 8,
        "unet": {"channels": (32, 64, 64), "layers_per_block": 1, "attention": False},
        "unet_steps": 4000, "unet_batch": 128, "unet_lr": 1e-3,
        "cnn": {"work_size": 16, "width": 32, "feat_dim": 64},
        "cnn_epochs": 60, "cnn_batch": 64, "cnn_lr": 2e-3, "max_train": None,
        "cnn_aug": {"shift": 0.1, "rot_deg": 10.0, "scale": 0.1, "flip": False},
    },
    "fashion_mnist": {
        "sample_size": 28,
        "unet": {"channels": (16, 32, 64), "layers_per_block": 1, "attention": False},
        "unet_steps": 2500, "unet_batch": 64, "unet_lr": 1e-3,
        "cnn": {"work_size": 28, "width": 32, "feat_dim": 128},
        "cnn_epochs": 4, "cnn_batch": 128, "cnn_lr": 2e-3, "max_train": None,
        "cnn_aug": {"shift": 0.05, "rot_deg": 0.0, "scale": 0.0, "flip": True},
    },
}


def recipe_for(size, num_images: int, flip: bool = False) -> dict:
    """A training recipe for a set this project ships none for, sized from its data.

    The UNet works at the image's side rounded up to a multiple of 4 (two down-samplings), at most 32:
    larger images are sampled at 32 and resized up, which is what a 2-core budget trains in minutes.
    Small sides get the digits recipe, larger the Fashion-MNIST one; the CNN sees about 100,000
    images in all (2 to 60 epochs). Augmentation is a small shift only, plus a horizontal flip when
    the caller says the data allows it (digits and text do not).
    """
    side = max(_hw(size))
    work = min(32, 4 * math.ceil(side / 4))
    base = RECIPES["digits"] if work <= 16 else RECIPES["fashion_mnist"]
    return {**base, "sample_size": work,
            "cnn": {**base["cnn"], "work_size": max(16, work)},
            "cnn_epochs": int(min(60, max(2, round(100_000 / max(1, num_images))))),
            "cnn_aug": {"shift": 0.05, "rot_deg": 0.0, "scale": 0.0, "flip": bool(flip)}}


# ----------------------------------------------------------------------------- size conversion

def _hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    h, w = _hw(size)
    if tuple(x.shape[-2:]) == (h, w):
        return x
    if h <= x.shape[-2] and w <= x.shape[-1]:
        return F.interpolate(x, size=(h, w), mode="area")
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def to_model_space(x_real: torch.Tensor, sample_size) -> torch.Tensor:
    """Real-size pixels (N, C, H, W) in [-1, 1] -> the UNet's working size (differentiable)."""
    return _resize(x_real, sample_size)


def to_real_size(x_model: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Model-size pixels -> the real set's (H, W) (area down, bilinear up; differentiable)."""
    return _resize(x_model, size)


# ----------------------------------------------------------------------------- diffusion model

def tiny_unet_config(sample_size, in_channels: int, num_classes: int, *,
                     channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1,
                     attention: bool = True) -> dict:
    """A small class-conditional UNet2DModel config; ``num_class_embeds = num_classes + 1`` (last = NULL).

    Attention is used in the lower-resolution blocks only (not the first).
    """
    n = len(channels)
    down = ["DownBlock2D"] + ["AttnDownBlock2D" if attention else "DownBlock2D"] * (n - 1)
    up = ["AttnUpBlock2D" if attention else "UpBlock2D"] * (n - 1) + ["UpBlock2D"]
    groups = math.gcd(8, *channels)
    return {
        "sample_size": sample_size if isinstance(sample_size, int) else list(_hw(sample_size)),
        "in_channels": in_channels,
        "out_channels": in_channels,
        "block_out_channels": list(channels),
        "layers_per_block": layers_per_block,
        "down_block_types": down,
        "up_block_types": up,
        "attention_head_dim": min(32, channels[-1]),
        "norm_num_groups": groups,
        "add_attention": attention,
        "num_class_embeds": num_classes + 1,
    }


def scheduler_config(num_train_timesteps: int = 1000) -> dict:
    """DDPM config: cosine (squaredcos_cap_v2) betas suit small images; epsilon prediction.

    ``clip_sample`` is off: DDIM clips x̂₀ but keeps the unclipped (CFG-amplified) ε, which at
    CFG 2-3 turns samples into speckle. Clamp the final images to [-1, 1] instead.
    """
    return {
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon",
        "clip_sample": False,
    }


def build_unet(config: dict):
    from diffusers import UNet2DModel

    return UNet2DModel(**config)


def null_class(unet) -> int:
    """The NULL (unconditional) class id of a UNet: its last class embedding."""
    return int(unet.config.num_class_embeds) - 1


# ----------------------------------------------------------------------------- feature CNN

class FeatureCNN(nn.Module):
    """Small classifier CNN; ``forward`` gives penultimate features (N, feat_dim), ``classify`` logits.

    Input: float (N, C, H, W) in [-1, 1] at the real set's size; resized internally to ``work_size``.
    GroupNorm only, so train/eval behave the same and gradients flow cleanly for guidance.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size=(8, 8),
                 work_size: int = 16, width: int = 32, feat_dim: int = 64):
        super().__init__()
        self.config = {
            "in_channels": in_channels, "num_classes": num_classes, "image_size": list(_hw(image_size)),
            "work_size": work_size, "width": width, "feat_dim": feat_dim,
        }
        w = width

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(
            block(in_channels, w), block(w, w), nn.AvgPool2d(2),
            block(w, 2 * w), block(2 * w, 2 * w), nn.AvgPool2d(2),
            block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.proj = nn.Sequential(nn.Linear(4 * w, feat_dim), nn.SiLU())
        self.head = nn.Linear(feat_dim, num_classes)

    @property
    def feat_dim(self) -> int:
        return self.config["feat_dim"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _resize(x, self.config["work_size"])
        return self.proj(self.body(x))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(x))

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------- loading

def _resolve(path_or_dataset: str | Path, part: str, marker: str) -> Path:
    """A packaged dataset name -> factory/weights/<name>/<part>; a folder -> itself or its <part>/."""
    s = str(path_or_dataset)
    candidates = []
    if "/" not in s and "\\" not in s and s not in (".", ".."):
        candidates.append(WEIGHTS_DIR / s / part)
    p = Path(s).expanduser()
    candidates += [p, p / part]
    for c in candidates:
        if (c / marker).is_file():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise ValueError(f"no {part} checkpoint for {s!r}: expected {marker} in one of: {tried}")


def load_unet(path_or_dataset: str | Path):
    """Load a UNet2DModel (eval mode) by packaged dataset name ("digits") or checkpoint folder."""
    from diffusers import UNet2DModel

    folder = _resolve(path_or_dataset, "unet", "config.json")
    return UNet2DModel.from_pretrained(str(folder)).eval()


def load_scheduler(path_or_dataset: str | Path, kind: str = "ddim"):
    """Load the noise schedule as a "ddim" (default, for few-step sampling) or "ddpm" scheduler."""
    from diffusers import DDIMScheduler, DDPMScheduler

    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    if kind not in classes:
        raise ValueError(f"scheduler kind must be one of {sorted(classes)}, got {kind!r}")
    folder = _resolve(path_or_dataset, "scheduler", "scheduler_config.json")
    return classes[kind].from_pretrained(str(folder))


def load_cnn(path_or_dataset: str | Path) -> FeatureCNN:
    """Load a FeatureCNN (eval mode) by packaged dataset name or folder (config.json + model.safetensors)."""
    from safetensors.torch import load_file

    folder = _resolve(path_or_dataset, "cnn", "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    model = FeatureCNN(**config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


# ----------------------------------------------------------------------------- training

def _setup(seed: int, threads: int = 2) -> torch.Generator:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


def _real(source: str, root: str | None, max_train: int | None, gen: torch.Generator, real=None):
    from factory.data import load_real

    real = real if real is not None else load_real(source, "train", root)
    x = torch.from_numpy(real.to_float())
    y = torch.from_numpy(real.labels)
    if max_train is not None and max_train < len(x):
        idx = torch.randperm(len(x), generator=gen)[:max_train]
        x, y = x[idx], y[idx]
    return real, x, y


def _recipe(source: str, real, recipe: dict | None) -> dict:
    return recipe or RECIPES.get(source) or recipe_for(real.size, len(real.labels))


def warmup_cosine(opt: torch.optim.Optimizer, total: int, warmup: int):
    """Linear warmup over ``warmup`` steps to the base rate, then cosine down to 5 % of it at ``total``."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    cosine = CosineAnnealingLR(opt, T_max=max(1, total - warmup), eta_min=0.05 * opt.param_groups[0]["lr"])
    ramp = LinearLR(opt, start_factor=1 / warmup, total_iters=max(1, warmup - 1))
    return SequentialLR(opt, [ramp, cosine], milestones=[warmup])


def train_unet(dataset: str, out_dir: str | Path, steps: int, seed: int = 0, *, root: str | None = None,
               recipe: dict | None = None, real=None,
               batch_size: int | None = None, lr: float | None = None, p_uncond: float = 0.1,
               ema_decay: float = 0.999, sample_size=None, unet_kwargs: dict | None = None,
               max_train: int | None = None, log_every: int = 250, threads: int = 2,
               init_from: str | Path | None = None) -> dict:
    """Train the class-conditional UNet (epsilon MSE, label dropout ``p_uncond`` to NULL, EMA weights).

    ``dataset`` is a data source (``root`` its folder or URI where it needs one; ``real`` its train split
    when already loaded); ``recipe`` defaults to the packaged one or :func:`recipe_for` the data.
    ``init_from`` continues from an existing UNet checkpoint (its config wins over ``unet_kwargs``).
    Writes ``out_dir/unet`` (EMA weights) and ``out_dir/scheduler``; returns a summary dict.
    """
    from diffusers import DDPMScheduler

    gen = _setup(seed, threads)
    real, x, y = _real(dataset, root, max_train, gen, real)
    recipe = _recipe(dataset, real, recipe)
    batch_size = batch_size or recipe["unet_batch"]
    lr = lr or recipe["unet_lr"]
    size = sample_size or recipe["sample_size"]
    x = to_model_space(x, size).contiguous()
    num_classes = real.num_classes

    if init_from is not None:
        unet = load_unet(init_from).train()
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        if config["sample_size"] != size or config["num_class_embeds"] != num_classes + 1:
            raise ValueError(f"checkpoint {init_from} does not fit {dataset} at sample_size {size}")
    else:
        config = tiny_unet_config(size, x.shape[1], num_classes, **(unet_kwargs or recipe["unet"]))
        unet = build_unet(config).train()
    ema = build_unet(config).eval()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    sched = DDPMScheduler(**scheduler_config())
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_schedule = warmup_cosine(opt, steps, warmup=min(200, steps // 10 + 1))
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"[unet:{dataset}] {n_params / 1e6:.2f}M params, sample_size={size}, {len(x)} train images, "
          f"{steps} steps x batch {batch_size}", flush=True)

    t0, c0, running = time.time(), time.process_time(), 0.0
    T = sched.config.num_train_timesteps
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        x0, labels = x[idx], y[idx].clone()
        labels[torch.rand(batch_size, generator=gen) < p_uncond] = num_classes
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, T, (batch_size,), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(xt, t, class_labels=labels).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_schedule.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            print(f"[unet:{dataset}] step {step + 1}/{steps} loss {running / n:.4f} "
                  f"({time.time() - t0:.0f}s wall, {time.process_time() - c0:.0f}s cpu)", flush=True)
            running = 0.0
    wall, cpu = time.time() - t0, time.process_time() - c0

    out_dir = Path(out_dir)
    ema.save_pretrained(str(out_dir / "unet"))
    sched.save_pretrained(str(out_dir / "scheduler"))
    return {"steps": steps, "init_from": None if init_from is None else str(init_from),
            "batch_size": batch_size, "lr": lr, "p_uncond": p_uncond, "ema_decay": ema_decay,
            "params": n_params, "train_images": len(x), "threads": threads,
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def _augment(x: torch.Tensor, gen: torch.Generator, shift: float = 0.1, rot_deg: float = 10.0,
             scale: float = 0.1, flip: bool = False) -> torch.Tensor:
    """Small random affine jitter (+ optional horizontal flip); the background is -1, so pad with -1."""
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(rot_deg)
    s = 1 + (torch.rand(n, generator=gen) * 2 - 1) * scale
    tx, ty = [(torch.rand(n, generator=gen) * 2 - 1) * shift * 2 for _ in range(2)]
    sx = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos * sx, -sin, tx], 1), torch.stack([sin * sx, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@torch.no_grad()
def accuracy(cnn: FeatureCNN, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of ``cnn.classify`` on float images x (N, C, H, W) in [-1, 1]."""
    cnn.eval()
    pred = torch.cat([cnn.classify(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).float().mean())


def train_cnn(dataset: str, out_dir: str | Path, epochs: int, seed: int = 0, *, root: str | None = None,
              recipe: dict | None = None, real=None,
              batch_size: int | None = None, lr: float | None = None, cnn_kwargs: dict | None = None,
              augment: bool | dict = True, max_train: int | None = None, threads: int = 2) -> dict:
    """Train the FeatureCNN classifier on the train split; writes ``out_dir/cnn``.

    ``augment``: True = the dataset recipe's jitter, False = none, or a dict of :func:`_augment` kwargs.

    The returned summary includes the test-split accuracy (reported, never used for selection; None
    when the set has no test split of its own).
    """
    gen = _setup(seed, threads)
    real, x, y = _real(dataset, root, max_train, gen, real)
    recipe = _recipe(dataset, real, recipe)
    batch_size = batch_size or recipe["cnn_batch"]
    lr = lr or recipe["cnn_lr"]
    aug = recipe.get("cnn_aug", {}) if augment is True else (augment or None)
    cnn = FeatureCNN(in_channels=x.shape[1], num_classes=real.num_classes, image_size=real.size,
                     **(cnn_kwargs or recipe["cnn"])).train()
    opt = torch.optim.AdamW(cnn.parameters(), lr=lr, weight_decay=5e-4)
    per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * per_epoch
    lr_schedule = warmup_cosine(opt, total, warmup=min(100, total // 10 + 1))
    print(f"[cnn:{dataset}] {sum(p.numel() for p in cnn.parameters()) / 1e6:.2f}M params, "
          f"{len(x)} train images, {epochs} epochs", flush=True)
    t0, c0, step = time.time(), time.process_time(), 0
    for epoch in range(epochs):
        cnn.train()
        perm = torch.randperm(len(x), generator=gen)
        tot_loss = 0.0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb = _augment(x[idx], gen, **aug) if aug is not None else x[idx]
            loss = F.cross_entropy(cnn.classify(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_schedule.step()
            tot_loss += loss.item() * len(idx)
            step += 1
        if (epoch + 1) % max(1, epochs // 10) == 0 or epoch + 1 == epochs:
            print(f"[cnn:{dataset}] epoch {epoch + 1}/{epochs} loss {tot_loss / len(x):.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    wall, cpu = time.time() - t0, time.process_time() - c0
    cnn.eval()
    test = _test_split(dataset, root)
    test_acc = None if test is None else round(accuracy(cnn, torch.from_numpy(test.to_float()),
                                                        torch.from_numpy(test.labels)), 4)
    train_acc = accuracy(cnn, x, y)
    print(f"[cnn:{dataset}] train acc {train_acc:.4f}, test acc {test_acc}", flush=True)
    cnn.save(Path(out_dir) / "cnn")
    return {"epochs": epochs, "batch_size": batch_size, "lr": lr, "augment": aug,
            "train_images": len(x), "train_acc": round(train_acc, 4), "test_acc": test_acc,
            "threads": threads, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def _test_split(source: str, root: str | None):
    """The set's test split, or None where it has none of its own (see :func:`factory.data.has_own_split`)."""
    from factory.data import DataError, has_own_split, load_real

    if not has_own_split(source, root, "test"):
        return None
    try:
        return load_real(source, "test", root)
    except DataError:
        return None


def train_embedded(source: str, out_dir: str | Path | None = None, seed: int = 0, quick: bool = False,
                   threads: int = 2, *, root: str | None = None, flip: bool = False,
                   max_images: int | None = None) -> dict:
    """Train UNet + scheduler + FeatureCNN on the train split of ``source`` into the folder ``out_dir``.

    ``out_dir`` defaults to the packaged ``factory/weights/<source>`` for digits and fashion_mnist; any
    other source needs one. Everything is written to ``<out_dir>.partial`` and moved into place last,
    training.json (the recipe, class names, wall times) included, so a crash leaves no half checkpoint.
    ``quick`` shrinks the run (steps/epochs/train set) for smoke tests.
    """
    import shutil

    from factory.data import load_real

    if out_dir is None:
        if source not in RECIPES:
            raise ValueError(f"train-embedded --source {source}: name the output folder (--out DIR)")
        out_dir = WEIGHTS_DIR / source
    out_dir = Path(out_dir)
    real = load_real(source, "train", root)  # a clear error for missing or unreadable data, before any work
    recipe = RECIPES.get(source) or recipe_for(real.size, len(real.labels), flip=flip)
    steps, epochs = recipe["unet_steps"], recipe["cnn_epochs"]
    max_train = max_images or recipe["max_train"]
    if quick:
        steps, epochs, max_train = max(20, steps // 100), 1, min(max_train or 2000, 2000)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.time()
    common = dict(root=root, recipe=recipe, real=real, max_train=max_train, threads=threads)
    cnn = train_cnn(source, staging, epochs, seed, **common)
    unet = train_unet(source, staging, steps, seed, **common)
    summary = {"dataset": source, "root": root, "seed": seed, "quick": quick, "torch": torch.__version__,
               "size": list(real.size), "mode": real.mode, "class_names": real.class_names,
               "recipe": recipe,
               "wall_s": round(time.time() - started, 1), "unet": unet, "cnn": cnn}
    (staging / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    for part in ("unet", "scheduler", "cnn", "training.json"):  # replace the parts, keep anything else there
        target = out_dir / part
        if target.is_dir():
            shutil.rmtree(target)
        (staging / part).replace(target)
    staging.rmdir()
    return summary
