"""One sampler for every backbone and any mix of guidance energies; the caller owns nothing else.

The loop runs over the scheduler's own timesteps. At a step where an energy is active, the sampler
forms x̂₀ from the model output (by the scheduler's prediction type), decodes it to pixels (through
the VAE for latent backbones), embeds it with the feature extractor, takes each energy's gradient
back to x_t, normalises it, and moves the step's x̂₀ against it, keeping x_t:

    x̂₀ ← x̂₀ − Σ_i γ_i · normalise(α_t ∇_{x_t} E_i(f(D(x̂₀(x_t)))))

and the scheduler then steps from the corrected prediction (for ε-prediction this is ε + (α_t/σ_t)·Δ).
This is the guidance direction of the papers (−γ∇E, paper 000 eq. 3; DMGD's −ρ_t∇E), with the step
measured in x̂₀ units so that γ means the same at every t: the score form's σ_t/α_t factor grows
without bound at the noisy end of the trajectory, where it made guidance overshoot and raise the
energy in our measurements. ``grad_through="model"`` backpropagates through the denoiser as well (the
papers' form); ``"x0"`` treats the model output as constant, the cheap variant. With no energy active
at a step the step is exactly the plain step, so a run with every energy off reproduces plain sampling
bit for bit. CFG with ω = 1 skips the unconditional pass.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch


class Backbone(Protocol):
    """What the sampler needs of a denoiser (see factory/backbones.py)."""

    def noise_shape(self, batch: int) -> tuple[int, ...]: ...
    def condition(self, labels: torch.Tensor) -> torch.Tensor: ...
    def null_condition(self, batch: int) -> torch.Tensor: ...
    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor: ...
    def decode(self, x0: torch.Tensor) -> torch.Tensor: ...  # model space -> pixels in [-1, 1]
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...  # pixels in [-1, 1] -> model space


@dataclass(frozen=True)
class MixedCondition:
    """Conditions whose denoiser outputs are averaged with ``weights`` (summing to 1) before CFG: a label
    softened in the model's predictions instead of in its embedding (DMGD's ``soft_labels.mix: output``).
    All conditions go through one batched pass with the unconditional one."""

    conds: tuple[torch.Tensor, ...]
    weights: tuple[float, ...]


@dataclass
class Guidance:
    """An energy with its strength and schedule. ``energy(features, frozen) -> scalar``, lower is better."""

    energy: Callable
    weight: float = 1.0
    every: int = 1  # G_freq: active on steps i with i % every == 0
    window: tuple[float, float] = (0.0, 1.0)  # active while i / steps is in [start, end]
    normalize: str = "l2"  # none | l2 | linf | latent | set
    name: str = "energy"

    def active(self, i: int, steps: int) -> bool:
        frac = i / steps
        return i % self.every == 0 and self.window[0] <= frac <= self.window[1]


@dataclass
class SampleResult:
    images: torch.Tensor  # pixels in [-1, 1], (B, C, H, W), on the backbone's device
    energy_trace: list[dict] = field(default_factory=list)  # per guided step: step, name, value


def normalize_grad(g: torch.Tensor, how: str, x: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient normalisation: l2 -> unit RMS, linf -> unit max, latent -> the norm of x_t; or
    set -> one scale for the batch (unit RMS over all of it), which keeps a set energy's relative step sizes:
    a sample its energy barely moves stays nearly still instead of being scaled up to a full step."""
    if how == "none":
        return g
    flat = g.flatten(1)
    eps = 1e-12
    if how == "set":
        return g / (flat.norm() / flat.numel() ** 0.5 + eps)
    if how == "l2":
        scale = flat.norm(dim=1) / flat.shape[1] ** 0.5
    elif how == "linf":
        scale = flat.abs().amax(dim=1)
    elif how == "latent":
        scale = flat.norm(dim=1) / x.flatten(1).norm(dim=1)
    else:
        raise ValueError(f"unknown gradient normalisation {how!r}")
    return g / (scale + eps).view(-1, *([1] * (g.dim() - 1)))


def is_flow(scheduler) -> bool:
    """Flow-matching schedulers (SD 3.5) keep sigmas and no alphas_cumprod."""
    return not hasattr(scheduler, "alphas_cumprod")


def _alpha_sigma(scheduler, t, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = α x₀ + σ ε at step i (timestep t)."""
    if is_flow(scheduler):
        s = scheduler.sigmas[i].to(torch.float32)
        return 1 - s, s
    a = scheduler.alphas_cumprod[int(t)].to(torch.float32)
    return a.sqrt(), (1 - a).sqrt()


def x0_and_eps(kind: str, model_out: torch.Tensor, x: torch.Tensor, a, s) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂₀, ε) of a DDPM-family model output at x_t = a·x₀ + s·ε (a² + s² = 1; a, s broadcast), by the
    scheduler's ``prediction_type``. The one home of this algebra: sampling and Real-Fake training use it."""
    if kind == "epsilon":
        return (x - s * model_out) / a, model_out
    if kind == "v_prediction":  # v = a·ε − s·x₀
        return a * x - s * model_out, a * model_out + s * x
    if kind == "sample":
        return model_out, (x - a * model_out) / s
    raise ValueError(f"unsupported prediction type {kind!r}")


def output_of(kind: str, x0: torch.Tensor, eps: torch.Tensor, a, s) -> torch.Tensor:
    """The model output that means (x₀, ε) under ``prediction_type`` ``kind``: the inverse of
    :func:`x0_and_eps`, and the training target of a denoiser."""
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return a * eps - s * x0
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction type {kind!r}")


def predict_x0(scheduler, model_out: torch.Tensor, x: torch.Tensor, t, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂₀, ε) from the model output, by the scheduler's prediction type (flow: v = ε − x₀)."""
    a, s = _alpha_sigma(scheduler, t, i)
    if is_flow(scheduler):
        x0 = x - s * model_out
        return x0, x0 + model_out
    return x0_and_eps(scheduler.config.prediction_type, model_out, x, a, s)


def guided_output(scheduler, model_out: torch.Tensor, x: torch.Tensor, t, i: int, delta_x0: torch.Tensor) -> torch.Tensor:
    """The model output whose x̂₀ is x̂₀ − delta_x0 at the same x_t, in the scheduler's parameterisation.

    At fixed x_t, moving x̂₀ by −Δ means ε + (α/σ)·Δ (flow matching: v + Δ/σ, σ floored at 0.05).
    """
    a, s = _alpha_sigma(scheduler, t, i)
    if is_flow(scheduler):
        return model_out + delta_x0 / s.clamp(min=0.05)
    x0, _ = predict_x0(scheduler, model_out, x, t, i)
    x0 = x0 - delta_x0
    return output_of(scheduler.config.prediction_type, x0, (x - a * x0) / s, a, s)


def takes_eta(scheduler) -> bool:
    """DDIM-family schedulers take ``eta``; DDPM, PNDM, Euler and flow matching do not."""
    return "eta" in inspect.signature(scheduler.step).parameters


def _alpha(scheduler, t: int) -> torch.Tensor:
    """DDIM's cumulative alpha at train timestep ``t`` (its final value below 0), as its ``step`` reads it."""
    return scheduler.alphas_cumprod[int(t)] if int(t) >= 0 else scheduler.final_alpha_cumprod


def _step(scheduler, out, t, x, eta, generator):
    if takes_eta(scheduler):
        return scheduler.step(out, t, x, eta=eta, generator=generator).prev_sample
    if eta:
        raise ValueError(f"{type(scheduler).__name__} has no eta: sampling.eta must be 0 with it")
    kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    return scheduler.step(out, t, x, **kwargs).prev_sample


def _terms(g: Guidance, feats: torch.Tensor, frozen) -> list[tuple[str, float, torch.Tensor]]:
    """An energy's scalar parts. Energies exposing ``terms()`` and ``weights`` (low-density, paper 001)
    get each term's gradient normalised separately before weighting, as that paper prescribes."""
    if hasattr(g.energy, "terms") and hasattr(g.energy, "weights"):
        weights = g.energy.weights
        return [(f"{g.name}.{k}", weights[k], v) for k, v in g.energy.terms(feats, frozen).items() if weights[k]]
    return [(g.name, 1.0, g.energy(feats, frozen))]


def predict_cfg(backbone: Backbone, x_in: torch.Tensor, t, cond, null, cfg_scale: float) -> torch.Tensor:
    """The denoiser's output with classifier-free guidance (``null`` None: one conditional pass); a
    :class:`MixedCondition`'s conditional output is the weighted mean of its conditions' outputs."""
    if isinstance(cond, MixedCondition):
        parts = [*cond.conds] + ([] if null is None else [null])
        outs = backbone.predict(torch.cat([x_in] * len(parts)), t, torch.cat(parts)).chunk(len(parts))
        c = sum(w * o for w, o in zip(cond.weights, outs))
        return c if null is None else outs[-1] + cfg_scale * (c - outs[-1])
    if null is None:
        return backbone.predict(x_in, t, cond)
    c, u = backbone.predict(torch.cat([x_in, x_in]), t, torch.cat([cond, null])).chunk(2)
    return u + cfg_scale * (c - u)


def model_output(backbone: Backbone, scheduler, x: torch.Tensor, t, i: int, cond, null, cfg_scale: float,
                 active: list[Guidance], features, frozen, grad_through: str, trace: list) -> torch.Tensor:
    """Step i's model output: CFG, then each ``active`` energy's normalised gradient moves x̂₀ (its value is
    appended to ``trace``). The sampler's step, and what the benchmark counts (factory.bench)."""
    with torch.enable_grad() if active and grad_through == "model" else torch.no_grad():
        xg = x.detach().requires_grad_(bool(active))
        x_in = scheduler.scale_model_input(xg, t) if hasattr(scheduler, "scale_model_input") else xg
        out = predict_cfg(backbone, x_in, t, cond, null, cfg_scale)
    if not active:
        return out
    if grad_through == "x0":
        out = out.detach()
    with torch.enable_grad():
        x0, _ = predict_x0(scheduler, out, xg, t, i)
        feats = features(backbone.decode(x0))
        a, _ = _alpha_sigma(scheduler, t, i)
        delta = torch.zeros_like(x)
        parts = [(g, name, w, value) for g in active for name, w, value in _terms(g, feats, frozen)]
        for j, (g, name, w, value) in enumerate(parts):
            (grad,) = torch.autograd.grad(value, xg, retain_graph=j < len(parts) - 1)
            # α·∇_{x_t}E is the gradient in x̂₀ units (exactly ∇_{x̂₀}E when the model output is held)
            delta += g.weight * w * normalize_grad(a * grad, g.normalize, x)
            trace.append({"step": i, "name": name, "value": value.detach()})
    return guided_output(scheduler, out.detach(), x, t, i, delta)


def sample(
    backbone: Backbone,
    scheduler,
    labels: torch.Tensor,
    generator: torch.Generator,
    steps: int,
    cfg_scale: float = 1.0,
    guidance: list[Guidance] = (),
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    frozen: torch.Tensor | None = None,
    condition: Callable[[int, int], torch.Tensor] | None = None,
    init_images: torch.Tensor | None = None,
    strength: float = 1.0,
    eta: float = 0.0,
    grad_through: str = "model",
    recurrence: int = 1,
) -> SampleResult:
    """Sample one batch of ``labels``.

    ``condition(i, steps)``, when given, returns the conditioning for step i (DMGD soft labels);
    otherwise ``backbone.condition(labels)`` is used throughout. ``init_images`` (pixels in [-1, 1])
    with ``strength`` < 1 starts from those images noised to that strength (img2img latent prior).
    ``frozen`` are features of already committed samples passed to every energy (greedy matching).
    ``recurrence`` r > 1 repeats each guided step r times, re-noising its result back to the step's
    noise level in between (Universal Guidance's self-recurrence, Bansal et al. 2023): the energy gets r
    pushes at each level, where one small push per step does not reach the energy's optimum. DDIM only.
    """
    if recurrence < 1:
        raise ValueError(f"recurrence must be >= 1, got {recurrence}")
    if recurrence > 1 and not hasattr(scheduler, "final_alpha_cumprod"):
        raise ValueError(f"recurrence > 1 re-noises with DDIM's schedule; {type(scheduler).__name__} has none")
    if guidance and features is None:
        raise ValueError("guidance energies need a feature extractor")
    batch = labels.shape[0]
    device = getattr(backbone, "device", torch.device("cpu"))
    scheduler.set_timesteps(steps)  # timesteps stay on the CPU: indexing the schedule never syncs the device
    timesteps = scheduler.timesteps
    # noise from the shard's CPU generator (the same bytes on any machine), then one copy to the device
    x = torch.randn(backbone.noise_shape(batch), generator=generator).to(device)
    if init_images is not None and strength < 1.0:
        start = min(int(round(steps * (1.0 - strength))), steps - 1)
        timesteps = timesteps[start:]
        x0 = backbone.encode(init_images.to(device))
        if is_flow(scheduler):
            scheduler.set_begin_index(start)
            x = scheduler.scale_noise(x0, timesteps[:1], x)
        else:
            x = scheduler.add_noise(x0, x, timesteps[:1].repeat(batch))
    else:
        x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    fixed_cond = backbone.condition(labels) if condition is None else None
    null = backbone.null_condition(batch) if cfg_scale != 1.0 else None
    trace = []
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        cond = fixed_cond if condition is None else condition(i, n)
        active = [g for g in guidance if g.active(i, n)]
        for r in range(recurrence if active else 1):
            if r:  # back from the previous level to t's: x_t = sqrt(a_t / a_prev) x_prev + sqrt(1 - a_t / a_prev) noise
                ratio = _alpha(scheduler, t) / _alpha(scheduler, int(t) - scheduler.config.num_train_timesteps
                                                       // scheduler.num_inference_steps)
                noise = torch.randn(x.shape, generator=generator).to(device)
                x = ratio.sqrt() * x + (1 - ratio).sqrt() * noise
            out = model_output(backbone, scheduler, x, t, i, cond, null, cfg_scale, active, features, frozen,
                               grad_through, trace)
            x = _step(scheduler, out.detach(), t, x, eta, generator)
    with torch.no_grad():
        images = backbone.decode(x).clamp(-1, 1)
    for row in trace:  # read back once, after the loop: no device sync per guided step
        row["value"] = float(row["value"])
    return SampleResult(images=images, energy_trace=trace)
