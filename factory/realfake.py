"""Real-Fake (paper 002): LoRA fine-tuning of a backbone's denoiser with the MMD-augmented loss, on Ray Train.

``L = L_simple + gamma * L_MMD`` (Eq. 21): the diffusion loss with the backbone's own schedule and condition
dropout, plus the squared MMD between the features of the model's x0 predictions and the batch's real
features (in the run's feature space; only samples with alpha_bar >= 0.05). Workers train under
``TorchTrainer``; ``prepare_model`` wraps the denoiser in DDP and the backbone routes its forward through it.
Rank 0 checkpoints every ``checkpoint_every`` steps, and a rerun resumes. The artifact is a peft adapter
folder plus ``realfake.json``, its completion marker, written last; ``backbone.options.lora`` loads it.
Bandwidths, LoRA targets and what is left out: docs/methods.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from factory.data import to_pixels
from factory.guidance.chamfer import pairwise_sq_dists
from factory.lora import ADAPTER_FILES
from factory.sampler import output_of, x0_and_eps

ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RESNET_TARGETS = r".*resnets\.\d+\.(conv1|conv2)"
MARKER = "realfake.json"
STATE_FILE = "state.pt"
MMD_SCALES = (0.5, 1.0, 2.0)  # bandwidths σ² as multiples of the median pairwise squared distance
MMD_MIN_ALPHA_BAR = 0.05  # the MMD term uses samples with ᾱ_t at least this (x̂₀ error ≤ 4.5 × ε̂ error)


# --- MMD ------------------------------------------------------------------------------------------


def median_bandwidths(feats: torch.Tensor, scales=MMD_SCALES) -> list[float]:
    """σ² = scale × the median of the off-diagonal pairwise squared distances of ``feats`` (detached)."""
    f = feats.detach().float()
    d = pairwise_sq_dists(f, f)
    off = d[~torch.eye(len(f), dtype=torch.bool, device=f.device)]
    med = float(off.median()) if off.numel() else 1.0
    med = med if med > 0 else 1.0
    return [s * med for s in scales]


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: list[float] | None = None) -> torch.Tensor:
    """Squared MMD between samples ``x`` (N, D) and ``y`` (M, D), biased V-statistic:

        MMD² = mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) − 2 mean_ij k(x_i, y_j),
        k(a, b) = mean_σ exp(−‖a − b‖² / (2σ²))

    ``bandwidths``: the σ² values; None = :func:`median_bandwidths` of ``y`` (the real features).
    """
    if bandwidths is None:
        bandwidths = median_bandwidths(y)
    x, y = x.float(), y.float()

    def k(a, b):
        d = pairwise_sq_dists(a, b)
        return torch.stack([torch.exp(-d / (2.0 * s)) for s in bandwidths]).mean(0)

    return k(x, x).mean() + k(y, y).mean() - 2.0 * k(x, y).mean()


# --- LoRA -----------------------------------------------------------------------------------------


def default_targets(denoiser: nn.Module) -> list[str] | str:
    """The attention projections when the denoiser has any, else the ResNet blocks' convolutions."""
    names = [n for n, _ in denoiser.named_modules()]
    if any(n.endswith("." + t) for n in names for t in ATTENTION_TARGETS):
        return list(ATTENTION_TARGETS)
    return RESNET_TARGETS


def add_lora(denoiser: nn.Module, rank: int, alpha: float | None = None, targets=None, seed: int = 0):
    """Wrap ``denoiser`` in a peft ``PeftModel`` with a fresh LoRA adapter (B = 0: the model is unchanged).

    The layers are replaced in place, so a backbone holding ``denoiser`` now runs through the adapter.
    Only the adapter's parameters require gradients. ``seed`` makes the A matrices the same on every
    worker.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                        target_modules=targets or default_targets(denoiser), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(denoiser, config)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad]


# --- loss -----------------------------------------------------------------------------------------


def _alphas(scheduler, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError("Real-Fake fine-tuning needs a DDPM-family noise schedule (alphas_cumprod); "
                         "flow-matching backbones (sd35m) are not supported")
    abar = scheduler.alphas_cumprod.to(torch.float32)[t.cpu()]
    return abar.sqrt(), (1 - abar).sqrt()


def loss_terms(backbone, features, images: torch.Tensor, labels: torch.Tensor, real_feats: torch.Tensor,
               generator: torch.Generator, mmd_weight: float = 0.05, p_uncond: float = 0.1) -> dict:
    """Eq. 21 on one batch: ``{"loss", "simple", "mmd"}`` (0-dim tensors; ``loss`` carries the graph).

    ``images``: the batch's real pixels in [-1, 1] (B, C, H, W); ``labels`` their classes;
    ``real_feats``: the features of those images (the MMD's real side). ``generator`` draws t, ε and
    the condition dropout.
    """
    scheduler = backbone.scheduler
    b = images.shape[0]
    with torch.no_grad():
        x0 = backbone.encode(images).float()
        cond = backbone.condition(labels)
        if p_uncond > 0:
            drop = torch.rand(b, generator=generator) < p_uncond
            if drop.any():
                null = backbone.null_condition(b)
                mask = drop.to(cond.device).view(-1, *([1] * (cond.dim() - 1)))
                cond = torch.where(mask, null.to(cond.dtype), cond)
    T = int(scheduler.config.num_train_timesteps)
    t = torch.randint(0, T, (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a, s = _alphas(scheduler, t)
    a, s = a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
    xt = a * x0 + s * noise
    out = backbone.predict(xt, t, cond).float()
    kind = scheduler.config.prediction_type
    target = output_of(kind, x0, noise, a, s)
    x0_hat, _ = x0_and_eps(kind, out, xt, a, s)
    simple = F.mse_loss(out, target)
    mmd = torch.zeros((), dtype=simple.dtype)
    keep = (a.view(-1) ** 2) >= MMD_MIN_ALPHA_BAR
    if mmd_weight > 0 and int(keep.sum()) >= 2:
        fake = features(backbone.decode(x0_hat[keep]).clamp(-1, 1))
        real = real_feats.to(fake.device)
        mmd = mmd2(fake, real).to(simple.device)
    return {"loss": simple + mmd_weight * mmd, "simple": simple.detach(), "mmd": mmd.detach()}


# --- Ray Train worker ------------------------------------------------------------------------------


def _step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + rank * 7_919 + step * 104_729) % 2**63)




def _models(config: dict):
    """The backbone and feature space of the run config (the producer's own loaders)."""
    from factory.config import from_dict
    from factory.data import RealSet
    from factory.generate import build_backbone, build_features

    cfg = from_dict(config["run_config"])
    meta = RealSet(config["images"][:1], config["labels"][:1], list(config["class_names"]), config["mode"])
    if cfg.backbone.name != "tiny":  # LoRA trains to_q / to_k / to_v: a fused QKV projection would bypass them
        cfg.backbone.options["fuse_projections"] = False
    return build_backbone(cfg, meta), build_features(cfg)


def train_loop(config: dict) -> None:
    """Ray Train worker: LoRA on the denoiser, resume from the latest checkpoint, train, report."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from peft import set_peft_model_state_dict
    from ray.train import Checkpoint
    from safetensors.torch import load_file

    from factory.generate import embed

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not config["use_gpu"]:
        torch.set_num_threads(config["threads"])
    ft = config["finetune"]
    backbone, features = _models(config)
    model = add_lora(backbone.modules()["denoiser"], ft["rank"], ft["alpha"], ft["target_modules"], config["seed"])
    params = lora_parameters(model)
    distributed = world > 1 and dist.is_initialized()
    opt = torch.optim.AdamW(params, lr=ft["lr"], weight_decay=0.0)

    start, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            set_peft_model_state_dict(model, load_file(os.path.join(d, ADAPTER_FILES[1])))
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
    if distributed:  # DDP: rank 0's weights broadcast once, gradients averaged in backward
        backbone.wrap_denoiser(ray.train.torch.prepare_model(backbone.modules()["denoiser"], move_to_device=False))

    images = to_pixels(config["images"])
    labels = torch.tensor(config["labels"], dtype=torch.long)
    real_feats = embed(features, images)
    n, batch = len(labels), min(ft["batch_size"], len(labels))
    steps, every = ft["steps"], ft["checkpoint_every"]
    device = params[0].device  # NCCL reduces device tensors only
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, simple, mmd, count since the last report
    for step in range(start, steps):
        gen = _step_generator(config["seed"], rank, step)
        idx = torch.randint(0, n, (batch,), generator=gen)
        terms = loss_terms(backbone, features, images[idx], labels[idx], real_feats[idx], gen,
                           ft["mmd_weight"], ft["p_uncond"])
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sums += torch.tensor([terms["loss"].item(), terms["simple"].item(), terms["mmd"].item(), 1.0],
                             dtype=torch.float64, device=device)
        done = step + 1
        if done % every == 0 or done == steps:
            if distributed:
                dist.all_reduce(sums)
            c = max(float(sums[3]), 1.0)
            history.append({"step": done, "loss": float(sums[0]) / c, "simple": float(sums[1]) / c,
                            "mmd": float(sums[2]) / c})
            sums.zero_()
            metrics = {"step": done, "history": history, "resumed_from": start, "digest": config["digest"]}
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    model.save_pretrained(d)
                    torch.save({"optimizer": opt.state_dict(), "step": done, "history": history},
                               os.path.join(d, STATE_FILE))
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)


# --- driver ---------------------------------------------------------------------------------------


def digest(cfg, recipe: str) -> str:
    """What the adapter depends on, hashed: the real set, backbone, features, seed and the fine-tuning settings
    (not steps, checkpoint_every, num_workers, use_gpu: more steps continue the same run)."""
    ft = cfg.recipes[recipe].finetune.model_dump()
    for key in ("steps", "checkpoint_every", "num_workers", "use_gpu"):
        ft.pop(key)
    backbone = cfg.backbone.model_dump()
    what = {"data": [cfg.data.source, cfg.data.root],  # the whole train split is used, whatever data.classes
            "backbone": backbone, "features": cfg.features.model_dump(), "seed": cfg.seed, "finetune": ft}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_marker(out: str) -> dict | None:
    """The completion marker of the adapter folder ``out`` (a path or URI), or None."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out)
    path = f"{root.rstrip('/')}/{MARKER}"
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _finished(path: str, storage_filesystem, steps: int):
    """The Ray Train result at ``path`` when it already reached ``steps``, else None."""
    from ray.train import Result

    try:
        result = Result.from_path(path, storage_filesystem=storage_filesystem)
    except RuntimeError:  # no run there yet, or no checkpoint reported
        return None
    metrics = result.metrics or {}
    return result if metrics.get("step", 0) >= steps and result.checkpoint is not None else None


def _publish(checkpoint, out: str, marker: dict) -> None:
    """Copy the adapter files of ``checkpoint`` to ``out``; the marker last."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    with checkpoint.as_directory() as d:
        for name in ADAPTER_FILES:
            fs.put_file(os.path.join(d, name), f"{root}/{name}")
    fs.pipe_file(f"{root}/{MARKER}", json.dumps(marker, indent=1, sort_keys=True).encode())


def finetune(cfg, recipe: str, train, out: str, storage_path: str, storage_filesystem=None) -> dict:
    """Fine-tune the backbone of ``cfg`` (a ``factory.config.Config``) with ``cfg.recipes[recipe].finetune``
    on the real set ``train`` (a ``RealSet``); write the adapter folder ``out`` (a path or URI).

    Ray Train runs under ``<storage_path>/realfake-<recipe>-<digest>`` and resumes from its latest
    checkpoint. Returns the marker written to ``out``: ``{"digest", "steps", "history": [{"step", "loss",
    "simple", "mmd"}], "resumed_from", "steps_trained", "seconds", "adapter"}``. When ``out`` already holds
    a complete adapter of the same digest and at least the steps, nothing runs (``steps_trained`` 0).
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ft = cfg.recipes[recipe].finetune
    if ft is None:
        raise ValueError(f"recipe {recipe!r} has no finetune block")
    key = digest(cfg, recipe)
    marker = read_marker(out)
    if marker and marker.get("digest") == key and marker.get("steps", 0) >= ft.steps:
        return {**marker, "steps_trained": 0}
    if storage_filesystem is None and "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)
    name = f"realfake-{recipe}-{key}"
    t0 = time.perf_counter()
    result = _finished(f"{storage_path.rstrip('/')}/{name}", storage_filesystem, ft.steps)
    trained = 0
    if result is None:
        config = {
            "run_config": cfg.to_dict(), "finetune": ft.model_dump(), "digest": key, "seed": cfg.seed,
            "images": train.images, "labels": train.labels.astype(np.int64), "class_names": list(train.class_names),
            "mode": train.mode, "use_gpu": ft.use_gpu, "threads": max(1, cfg.executor.torch_threads),
        }
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=ft.num_workers, use_gpu=ft.use_gpu),
            run_config=RunConfig(storage_path=storage_path, name=name, storage_filesystem=storage_filesystem,
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
        )
        result = trainer.fit()
        trained = result.metrics["step"] - result.metrics["resumed_from"]
    metrics = result.metrics
    summary = {"digest": key, "steps": int(metrics["step"]), "history": [dict(h) for h in metrics["history"]],
               "resumed_from": int(metrics["resumed_from"]), "steps_trained": int(trained),
               "seconds": round(time.perf_counter() - t0, 2), "adapter": out,
               "finetune": ft.model_dump()}
    _publish(result.checkpoint, out, summary)
    return summary
