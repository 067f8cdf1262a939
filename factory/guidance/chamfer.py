"""Chamfer guidance energy (paper 000: "Increasing the Utility of Synthetic Images through Chamfer Guidance").

The squared-L2 Chamfer distance between k real reference features X and the batch's features Y:
coverage (every reference has a sample nearby) + fidelity (every sample is near a reference). What the paper
leaves open and what we chose — one gradient scale for the class's set, every step with a small gamma,
the terms' balance when k < batch, K-means references weighted by cluster mass, ``frozen`` for
progressive batches, a shard's images chosen among several guided sets (``select``) — is in
docs/methods.md, with the measurements in docs/science.md.

Nothing here knows about Ray or diffusion models; all functions are pure and deterministic.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "pairwise_sq_dists",
    "chamfer_distance",
    "ChamferEnergy",
    "select_references",
    "select_reference_indices",
]

ArrayLike = Union[Tensor, np.ndarray]


def _as_tensor(x: ArrayLike) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return torch.as_tensor(np.asarray(x))


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    """At least float32 (features may come as fp16/bf16 from an extractor)."""
    dt = torch.float32
    for t in ts:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def pairwise_sq_dists(x: Tensor, y: Tensor) -> Tensor:
    """Squared Euclidean distances ``D[i, j] = ||x_i - y_j||^2`` of shape [N, M].

    Uses the ``|x|^2 + |y|^2 - 2 x.y`` expansion (memory O(NM), not O(NMD)) after
    centring both sets on the mean of ``x`` (a translation, so exact in
    arithmetic; it removes most of the cancellation error of the expansion for
    features with a large common offset).  Clamped at 0.
    """
    c = x.detach().mean(dim=0, keepdim=True)
    xc = x - c
    yc = y - c
    d = (xc * xc).sum(-1, keepdim=True) + (yc * yc).sum(-1).unsqueeze(0) - 2.0 * (xc @ yc.T)
    return d.clamp_min(0.0)


def chamfer_distance(
    x_ref: Tensor,
    y: Tensor,
    coverage_weight: float = 1.0,
    fidelity_weight: float = 1.0,
) -> Tensor:
    """Chamfer distance between reference set ``x_ref`` [k, D] and set ``y`` [n, D].

    ``coverage_weight * mean_x min_y ||x-y||^2 + fidelity_weight * mean_y min_x ||x-y||^2``
    with squared L2 distances (paper 000, Eq. "L_Chamfer"; both weights 1 in
    the paper).  Differentiable in both arguments (``min`` back-propagates to
    the arg-min, a valid sub-gradient).  Returns a 0-d tensor.
    """
    if x_ref.ndim != 2 or y.ndim != 2:
        raise ValueError(f"expected 2-D feature sets, got {tuple(x_ref.shape)} and {tuple(y.shape)}")
    if x_ref.shape[1] != y.shape[1]:
        raise ValueError(f"feature dims differ: {x_ref.shape[1]} vs {y.shape[1]}")
    if x_ref.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("chamfer_distance needs non-empty sets")
    d = pairwise_sq_dists(x_ref, y)  # [k, n]
    coverage = d.min(dim=1).values.mean()
    fidelity = d.min(dim=0).values.mean()
    return coverage_weight * coverage + fidelity_weight * fidelity


class ChamferEnergy:
    """Chamfer guidance energy for one class (or one reference set).

    Parameters
    ----------
    refs:
        Reference features ``[k, D]`` (e.g. from :func:`select_references`).
    coverage_weight, fidelity_weight:
        Weights of the two terms (paper 000 uses 1 and 1).
    balance:
        Scale fidelity by ``min(1, k / B)`` for a batch of B: with fewer references than samples the
        coverage term pulls only k of them while fidelity pulls all B onto the k references, which
        collapses the set (k = 2, B = 10: coverage below plain sampling). Off = the paper's form.
    masses:
        Optional ``[k]`` weights of the references in the coverage term (normalised to sum to 1; None =
        the paper's plain mean). With K-means centres as references each weighs its cluster's share of
        the class: unweighted, a few outlying centres would pull as hard as the class's bulk.

    Calling ``energy(features, frozen=None)`` returns a differentiable scalar
    (lower is better)::

        coverage_weight * sum_{x in refs} m_x min_{y in cat(frozen, features)} ||x - y||^2   (m = 1/k)
      + fidelity_weight * mean_{y in features} min_{x in refs} ||x - y||^2

    ``frozen`` (``[M, D]``, already committed samples of the same class) is
    detached; with ``frozen=None`` (or empty) this is exactly
    :func:`chamfer_distance` ``(refs, features)``.  Computation is done in at
    least float32 on ``features``' device; the result has that dtype.
    """

    def __init__(self, refs: ArrayLike, coverage_weight: float = 1.0, fidelity_weight: float = 1.0,
                 balance: bool = False, masses: Optional[ArrayLike] = None):
        refs = _as_tensor(refs)
        if refs.ndim != 2 or refs.shape[0] == 0:
            raise ValueError(f"refs must be a non-empty [k, D] tensor, got {tuple(refs.shape)}")
        self.refs = refs.detach()
        self.masses = None
        if masses is not None:
            m = _as_tensor(masses).detach().double().reshape(-1)
            if m.shape[0] != refs.shape[0] or not bool(torch.isfinite(m).all()) or bool((m < 0).any()) or m.sum() <= 0:
                raise ValueError(f"masses must be {refs.shape[0]} finite non-negative weights, not all 0")
            self.masses = m / m.sum()
        self.coverage_weight = float(coverage_weight)
        self.fidelity_weight = float(fidelity_weight)
        if not isinstance(balance, bool):
            raise ValueError(f"balance must be true or false, got {balance!r}")
        self.balance = balance

    @classmethod
    def from_features(
        cls,
        train_features: ArrayLike,
        k: int = 32,
        seed: int = 0,
        coverage_weight: float = 1.0,
        fidelity_weight: float = 1.0,
    ) -> "ChamferEnergy":
        """Build from a class's training features with ``k`` seeded random references."""
        return cls(select_references(train_features, k, seed), coverage_weight, fidelity_weight)

    @property
    def num_refs(self) -> int:
        return int(self.refs.shape[0])

    def terms(self, features: Tensor, frozen: Optional[Tensor] = None) -> dict:
        """The unweighted ``{"coverage": ..., "fidelity": ...}`` scalars."""
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"features must be a non-empty [B, D] tensor, got {tuple(features.shape)}")
        dt = _compute_dtype(features, self.refs)
        refs = self.refs.to(device=features.device, dtype=dt)
        y = features.to(dt)
        d_new = pairwise_sq_dists(refs, y)  # [k, B]
        fidelity = d_new.min(dim=0).values.mean()
        nearest = d_new.min(dim=1).values  # [k]
        if frozen is not None and frozen.shape[0] > 0:
            fz = frozen.detach().to(device=features.device, dtype=dt)
            d_old = pairwise_sq_dists(refs, fz).min(dim=1).values
            nearest = torch.minimum(nearest, d_old)
        if self.masses is None:
            coverage = nearest.mean()
        else:
            coverage = (nearest * self.masses.to(device=nearest.device, dtype=dt)).sum()
        return {"coverage": coverage, "fidelity": fidelity}

    def __call__(self, features: Tensor, frozen: Optional[Tensor] = None) -> Tensor:
        t = self.terms(features, frozen)
        fidelity_weight = self.fidelity_weight
        if self.balance:
            fidelity_weight *= min(1.0, self.num_refs / features.shape[0])
        out = self.coverage_weight * t["coverage"] + fidelity_weight * t["fidelity"]
        return out.to(features.dtype) if features.dtype.is_floating_point else out

    def select(self, candidates: Tensor, n: int) -> Tensor:
        """Indices of the ``n`` rows of ``candidates`` [M, D] whose set has the lowest energy, chosen greedily.

        Guidance moves each set towards the energy's optimum but stops short of it; sampling M > n
        candidates and keeping the n that minimise the same energy closes part of that gap. With the set's
        size fixed at n, fidelity is a per-sample cost (its mean has denominator n), so each greedy pick adds
        the candidate that lowers ``coverage + fidelity_weight·fidelity`` most: O(n·k·M), no re-evaluation
        of the whole energy per candidate. Ties go to the lower index; same input, same indices.
        """
        if candidates.ndim != 2 or not 1 <= n <= candidates.shape[0]:
            raise ValueError(f"need 1 <= n <= {candidates.shape[0]} candidates, got n = {n}")
        dt = torch.float64
        y = candidates.detach().to(dt)
        d = pairwise_sq_dists(self.refs.to(device=y.device, dtype=dt), y)  # [k, M]
        masses = (torch.full((d.shape[0],), 1.0 / d.shape[0], dtype=dt, device=y.device) if self.masses is None
                  else self.masses.to(device=y.device, dtype=dt))
        fidelity_weight = self.fidelity_weight * (min(1.0, self.num_refs / n) if self.balance else 1.0)
        per_sample = fidelity_weight * d.min(dim=0).values / n  # [M]
        nearest = torch.full((d.shape[0],), float("inf"), dtype=dt, device=y.device)
        taken = torch.zeros(d.shape[1], dtype=torch.bool, device=y.device)
        chosen = []
        for _ in range(n):
            cover = (masses[:, None] * torch.minimum(nearest[:, None], d)).sum(0)  # coverage if each were added
            cost = self.coverage_weight * cover + per_sample
            cost[taken] = float("inf")
            j = int(torch.argmin(cost))
            chosen.append(j)
            taken[j] = True
            nearest = torch.minimum(nearest, d[:, j])
        return torch.tensor(chosen, dtype=torch.long)

    def __repr__(self) -> str:
        return (
            f"ChamferEnergy(k={self.num_refs}, dim={self.refs.shape[1]}, "
            f"coverage_weight={self.coverage_weight}, fidelity_weight={self.fidelity_weight}, balance={self.balance}, "
            f"weighted={self.masses is not None})"
        )


def select_reference_indices(num_items: int, k: int, seed: int = 0) -> Tensor:
    """``min(k, num_items)`` distinct indices in ``[0, num_items)``, seeded, sorted ascending.

    A uniformly random subset without replacement drawn with a private
    ``torch.Generator`` (paper 000 uses a random subset of k real images per
    class and does not study the selection strategy).  Same ``(num_items, k,
    seed)`` gives the same indices on every machine.
    """
    if k <= 0:
        raise ValueError("k must be positive")
    if num_items <= 0:
        raise ValueError("need at least one item to select references from")
    if k >= num_items:
        return torch.arange(num_items)
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(num_items, generator=g)[:k]
    return idx.sort().values


def select_references(train_features: ArrayLike, k: int, seed: int = 0) -> Tensor:
    """Choose ``k`` reference rows of ``train_features`` [N, D] (one class) deterministically.

    Random subset without replacement (see :func:`select_reference_indices`),
    returned in ascending index order; if ``k >= N`` all rows are returned.
    Returns a tensor (numpy input is converted).
    """
    feats = _as_tensor(train_features)
    if feats.ndim != 2:
        raise ValueError(f"train_features must be [N, D], got {tuple(feats.shape)}")
    idx = select_reference_indices(int(feats.shape[0]), k, seed)
    return feats[idx.to(feats.device)]
