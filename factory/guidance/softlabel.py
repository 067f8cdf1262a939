"""Dynamic soft-label semantic guidance (paper 003, DMGD, "Dynamic Semantic Matching").

The class condition becomes time-varying: random exploration (``t_frac >= explore_from``), the label
diffusion ``sqrt(sigma_t) f(y) + (1 - sqrt(sigma_t)) (beta_s f(y*) + beta_n n)`` towards a random other class
y*, then the pure class embedding (``t_frac <= refine_until``); ``t_frac = t / T``, 1 = pure noise. Works on
any embedding shape; all randomness comes from the given generator. sigma_t's schedule, the exploration
condition and the noise's anisotropy (the paper leaves them open) are in docs/methods.md.

Where the label is softened is open too. The paper interpolates the embedding; :func:`soft_label_parts` gives the
two ends (r, the decayed label) so that a sampler can instead mix the two conditions' *outputs* with weights r and
1 - r. On the Fashion-MNIST UNet (a learned class-embedding table) the interpolated embeddings are ones it never
saw in training and, amplified by CFG, cost the images their class; mixing outputs keeps it (docs/science.md).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "EXPLORE_FROM",
    "REFINE_UNTIL",
    "BETA_S",
    "BETA_N",
    "stage",
    "sigma_t",
    "soft_label_embedding",
    "soft_label_parts",
    "soft_label_mean",
    "pick_other_class",
    "embedding_noise_std",
]

#: Paper 003: random exploration for t >= 45 of T = 50.
EXPLORE_FROM: float = 45 / 50
#: Paper 003: semantic refinement for t <= 25 of T = 50.
REFINE_UNTIL: float = 25 / 50
#: Paper 003 soft-label coefficients.
BETA_S: float = 0.01
BETA_N: float = 0.06

Schedule = Union[str, Callable[[float], float]]


def _check_bounds(explore_from: float, refine_until: float) -> None:
    if not (0.0 <= refine_until < explore_from <= 1.0):
        raise ValueError(f"need 0 <= refine_until < explore_from <= 1, got {refine_until}, {explore_from}")


def stage(t_frac: float, explore_from: float = EXPLORE_FROM, refine_until: float = REFINE_UNTIL) -> str:
    """``"explore"`` (t_frac >= explore_from), ``"refine"`` (t_frac <= refine_until) or ``"soft"``."""
    _check_bounds(explore_from, refine_until)
    t = float(t_frac)
    if t >= explore_from:
        return "explore"
    if t <= refine_until:
        return "refine"
    return "soft"


def sigma_t(
    t_frac: float,
    explore_from: float = EXPLORE_FROM,
    refine_until: float = REFINE_UNTIL,
    schedule: Schedule = "linear",
) -> float:
    """The label-diffusion schedule sigma_t in [0, 1]: 0 while exploring, 1 while refining."""
    st = stage(t_frac, explore_from, refine_until)
    if st == "explore":
        return 0.0
    if st == "refine":
        return 1.0
    s = (explore_from - float(t_frac)) / (explore_from - refine_until)
    if callable(schedule):
        v = float(schedule(s))
    elif schedule == "linear":
        v = s
    elif schedule == "cosine":
        v = math.sin(0.5 * math.pi * s) ** 2
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min(1.0, max(0.0, v))


def embedding_noise_std(embedding_table: Tensor) -> Tensor:
    """Per-dimension std over a class-embedding table ``[C, ...]`` (-> shape ``[...]``)."""
    return embedding_table.detach().float().std(dim=0, unbiased=False)


def _default_noise_std(class_embedding: Tensor, other_class_embedding: Tensor) -> Tensor:
    return (class_embedding - other_class_embedding).abs() / math.sqrt(2.0)


def soft_label_mean(
    t_frac: float,
    class_embedding: Tensor,
    other_class_embedding: Tensor,
    *,
    explore_from: float = EXPLORE_FROM,
    refine_until: float = REFINE_UNTIL,
    beta_s: float = BETA_S,
    schedule: Schedule = "linear",
) -> Tensor:
    """Expectation over the noise of :func:`soft_label_embedding`:
    ``sqrt(sigma) f(y) + (1 - sqrt(sigma)) beta_s f(y*)``."""
    r = math.sqrt(sigma_t(t_frac, explore_from, refine_until, schedule))
    if r == 1.0:
        return class_embedding
    other = other_class_embedding.to(class_embedding)
    return r * class_embedding + (1.0 - r) * beta_s * other


def soft_label_parts(
    t_frac: float,
    class_embedding: Tensor,
    other_class_embedding: Tensor,
    generator: Optional[torch.Generator],
    *,
    explore_from: float = EXPLORE_FROM,
    refine_until: float = REFINE_UNTIL,
    beta_s: float = BETA_S,
    beta_n: float = BETA_N,
    schedule: Schedule = "linear",
    noise_std: Union[None, float, Tensor] = None,
    baseline: Optional[Tensor] = None,
) -> tuple[float, Optional[Tensor]]:
    """``(r, decayed)``: the weight ``r = sqrt(sigma_t)`` of the class's own embedding and the label it decays
    to, ``baseline + beta_s f(y*) + beta_n n`` (``None`` in the refinement stage, where ``r = 1`` and the
    generator is not consumed). :func:`soft_label_embedding` is ``r f(y) + (1 - r) decayed``; a sampler that
    softens the label in its predictions instead mixes the two conditions' outputs with weights r and 1 - r."""
    r = math.sqrt(sigma_t(t_frac, explore_from, refine_until, schedule))
    if r == 1.0:
        return 1.0, None
    if generator is None:
        raise ValueError("a torch.Generator is required outside the refinement stage")
    f = class_embedding
    other = other_class_embedding.to(device=f.device, dtype=f.dtype).expand_as(f)
    if noise_std is None:
        std = _default_noise_std(f, other)
    elif isinstance(noise_std, Tensor):
        std = noise_std.to(device=f.device, dtype=f.dtype)
    else:
        std = torch.full((), float(noise_std), device=f.device, dtype=f.dtype)
    gen_dtype = torch.float32 if f.dtype in (torch.float16, torch.bfloat16) else f.dtype
    n = torch.randn(f.shape, generator=generator, device=generator.device, dtype=gen_dtype)
    n = n.to(device=f.device, dtype=f.dtype) * std
    base = 0.0 if baseline is None else baseline.to(device=f.device, dtype=f.dtype).expand_as(f)
    return r, base + beta_s * other + beta_n * n


def soft_label_embedding(
    t_frac: float,
    class_embedding: Tensor,
    other_class_embedding: Tensor,
    generator: Optional[torch.Generator],
    **options,
) -> Tensor:
    """Conditioning embedding for the current step (paper 003, dynamic soft label); ``options`` are
    :func:`soft_label_parts`' keywords (the stage boundaries, beta_s, beta_n, schedule, noise_std, baseline).

    ``baseline`` (ours, default none = the zero vector): the embedding that the diffused label decays
    to, ``f~ = r f(y) + (1 - r) (baseline + beta_s f(y*) + beta_n n)``. Passing the model's learned
    null (unconditional) embedding makes the exploration stage the unconditional model, slightly
    perturbed, instead of a near-zero condition that a class-embedding model never saw in training
    (on the 28x28 Fashion-MNIST UNet the zero baseline, amplified by CFG, saturates the images).

    ``f~ = sqrt(sigma_t) f(y) + (1 - sqrt(sigma_t)) (beta_s f(y*) + beta_n n)``,
    ``n = noise_std * N(0, I)`` drawn from ``generator``; ``sigma_t`` from
    :func:`sigma_t` (0 in the exploration stage, 1 in the refinement stage).
    In the refinement stage the *same tensor object* ``class_embedding`` is
    returned and the generator is not consumed.  ``other_class_embedding``
    (f(y*), e.g. from :func:`pick_other_class`) must broadcast to
    ``class_embedding``'s shape.  Output has ``class_embedding``'s shape, dtype
    and device.  The caller picks y* (once per sample or per step -- the paper
    says "a randomly selected label from another class").
    """
    r, decayed = soft_label_parts(t_frac, class_embedding, other_class_embedding, generator, **options)
    return class_embedding if decayed is None else r * class_embedding + (1.0 - r) * decayed


def pick_other_class(
    label: Union[int, Tensor], num_classes: int, generator: torch.Generator
) -> Union[int, Tensor]:
    """A uniformly random class ``!= label`` (y* of paper 003), from ``generator``.

    ``label`` may be an int (returns an int) or a LongTensor of labels (returns
    one draw per element, same shape/device).  With ``num_classes == 1`` there
    is no other class and ``label`` itself is returned.
    """
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    if isinstance(label, Tensor):
        lab = label.long()
        if num_classes == 1:
            return lab.clone()
        r = torch.randint(0, num_classes - 1, lab.shape, generator=generator, device=generator.device)
        r = r.to(lab.device)
        return r + (r >= lab).long()
    lab = int(label)
    if not (0 <= lab < num_classes):
        raise ValueError(f"label {lab} out of range for {num_classes} classes")
    if num_classes == 1:
        return lab
    r = int(torch.randint(0, num_classes - 1, (1,), generator=generator, device=generator.device).item())
    return r + (1 if r >= lab else 0)
