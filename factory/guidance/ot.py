"""Optimal-transport distribution-matching energy (paper 003, DMGD: "Distribution Approximation" and
"Greedy Progressive Matching").

The entropic OT cost (POT's ``sinkhorn2``, torch backend) between the batch's features (uniform masses) and the
class's K-means support (masses = cluster shares): ``<gamma*, C>``, C the squared distance over a fixed cost
scale. The choices the paper leaves open (cost and its scale, float64 / log-domain Sinkhorn, gradient through
the plan or not, ``frozen`` samples, the time window) are in docs/methods.md.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor


def _pot():
    """POT on its numpy and torch backends only: on import it probes JAX, CuPy and TensorFlow when they are
    installed, and JAX then preallocates 75 % of the GPU (seen on an H200: 105 GiB gone, the denoiser OOM)."""
    for backend in ("JAX", "CUPY", "TENSORFLOW"):
        os.environ.setdefault(f"POT_BACKEND_DISABLE_{backend}", "1")
    import ot

    return ot

__all__ = [
    "DMGD_OT_WINDOW",
    "in_ot_window",
    "kmeans_support",
    "cost_scale_from_features",
    "partition_masses",
    "OTEnergy",
]

ArrayLike = Union[Tensor, np.ndarray]

#: OT guidance window of paper 003 (t in [30, 45] out of T = 50 DiT steps),
#: as (low, high) fractions t / T with 1 = start of sampling (pure noise).
DMGD_OT_WINDOW: Tuple[float, float] = (30 / 50, 45 / 50)

# exp(-x) underflows in float64 for x > ~745; keep a margin.
_MAX_EXPONENT = 30.0  # beyond exp(-30) per entry the plain kernel loses whole rows; use the log domain


def in_ot_window(t_frac: float, window: Tuple[float, float] = DMGD_OT_WINDOW) -> bool:
    """Whether ``t_frac = t / T`` (1 = pure noise, 0 = clean) lies in ``[low, high]``."""
    lo, hi = window
    return lo <= float(t_frac) <= hi


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def kmeans_support(
    train_features: ArrayLike, K: int = 10, seed: int = 0
) -> Tuple[Tensor, Tensor]:
    """Intra-class K-means quantisation of one class's features (paper 003, Eq. for P~_T).

    Returns ``(support [K', D] float32, masses [K'] float32)`` with
    ``masses[i] = |cluster i| / N`` (sums to 1).  ``K' = min(K, N)``; clusters
    that end up empty (only possible with duplicate points) are dropped.
    scikit-learn ``KMeans(n_clusters=K, n_init=10, random_state=seed)`` in
    float64, run with OpenMP/BLAS limited to one thread (``threadpoolctl``), so
    the result is deterministic for a given seed and does not depend on the
    machine's thread count (per-class K-means is small; one thread also avoids
    heavy oversubscription slow-downs seen on small shared CPUs).  Support points
    are ordered by decreasing mass (ties: by first coordinate, then index) so
    the order does not depend on KMeans' internal label permutation.
    """
    from sklearn.cluster import KMeans

    X = _to_numpy(train_features)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"train_features must be a non-empty [N, D] array, got {X.shape}")
    n = X.shape[0]
    k = int(min(K, n))
    if k <= 0:
        raise ValueError("K must be positive")
    if k == 1:
        centers = X.mean(axis=0, keepdims=True)
        counts = np.array([n], dtype=np.float64)
    else:
        from threadpoolctl import threadpool_limits

        km = KMeans(n_clusters=k, n_init=10, random_state=int(seed))
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            # duplicate points -> "Number of distinct clusters found smaller than n_clusters"
            warnings.simplefilter("ignore")
            labels = km.fit_predict(X)
        counts = np.bincount(labels, minlength=k).astype(np.float64)
        centers = km.cluster_centers_
        keep = counts > 0
        centers, counts = centers[keep], counts[keep]
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], centers[i, 0], i))
    centers, counts = centers[order], counts[order]
    masses = counts / counts.sum()
    return (
        torch.as_tensor(centers, dtype=torch.float32),
        torch.as_tensor(masses, dtype=torch.float32),
    )


def cost_scale_from_features(train_features: ArrayLike) -> float:
    """``E||x - x'||^2 = 2 * sum_d Var_d`` over the rows of ``train_features`` (i.i.d. pairs).

    The fixed normaliser of the OT cost built by :meth:`OTEnergy.from_features`.
    Falls back to 1.0 for a degenerate (single-point / constant) set.
    """
    X = _to_numpy(train_features)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"train_features must be a non-empty [N, D] array, got {X.shape}")
    s = 2.0 * float(X.var(axis=0).sum())
    return s if s > 0 and math.isfinite(s) else 1.0


def _support_cost_scale(support: Tensor, masses: Tensor) -> float:
    """``E_{k,l ~ m} ||s_k - s_l||^2 = 2 sum_k m_k ||s_k - mean_m||^2`` (1.0 if 0)."""
    s = support.double()
    m = masses.double()
    mu = (m[:, None] * s).sum(0)
    val = float(2.0 * (m * ((s - mu) ** 2).sum(-1)).sum())
    return val if val > 0 and math.isfinite(val) else 1.0


def _largest_remainder(masses: np.ndarray, total: int) -> np.ndarray:
    """Integer quotas summing to ``total`` proportional to ``masses`` (Hamilton method,
    ties broken by lower index)."""
    raw = masses * total
    base = np.floor(raw).astype(np.int64)
    rest = int(total - base.sum())
    if rest > 0:
        frac = raw - base
        order = sorted(range(len(masses)), key=lambda i: (-frac[i], i))
        for i in order[:rest]:
            base[i] += 1
    return base


def partition_masses(
    masses: ArrayLike,
    num_shards: int,
    shard_index: int,
    num_samples: Optional[int] = None,
    span: Optional[Tuple[float, float]] = None,
) -> Tensor:
    """The part of a class's target measure that shard ``shard_index`` of ``num_shards`` should fill.

    Why: DMGD's greedy progressive matching assumes all samples of a class are
    generated in sequence, each seeing the previous ones (``frozen``).  When a
    class's samples are spread over shards that cannot see each other, letting
    every shard match the *whole* measure makes the shards duplicate the
    heavy clusters.  Instead the target measure is cut into consecutive pieces
    (clusters in the given order, cumulative mass laid out on [0, 1]) so that
    shard ``s`` owns the mass in its own sub-interval.  The shard pieces,
    weighted by the shards' sample counts, add up to the class measure, so the
    union of all shards' outputs matches it.

    * ``num_samples=None``: continuous split -- shard ``s`` owns
      ``[s/S, (s+1)/S)`` of the cumulative mass.
    * ``num_samples=n``: the class produces ``n`` samples in total, shard
      ``s`` produces ``n // S + (s < n % S)`` of them (the usual even split;
      shards with no samples get all-zero masses).  Cluster ``i`` is given an
      integer quota ``round(n * m_i)`` (largest-remainder rounding) of sample
      slots, and shard ``s`` owns a contiguous block of slots.
    * ``span=(lo, hi)``: the shard owns the fraction ``[lo, hi)`` of the class's
      cumulative mass (for plans whose shards are not an even split: a shard
      holding samples ``[a, b)`` of ``n`` passes ``(a / n, b / n)``).

    Returns the shard's masses (``[K]``, same order as ``masses``, normalised
    to sum to 1 unless the shard is empty; zero entries mean "not this
    shard's cluster").  :class:`OTEnergy` drops zero-mass support points.
    Deterministic; no randomness involved.
    """
    m = _to_numpy(masses).reshape(-1)
    if m.size == 0 or np.any(m < 0) or m.sum() <= 0:
        raise ValueError("masses must be non-negative with positive sum")
    if num_shards <= 0 or not (0 <= shard_index < num_shards):
        raise ValueError(f"bad shard_index {shard_index} for num_shards {num_shards}")
    m = m / m.sum()
    S = int(num_shards)
    if span is not None:
        edges = np.concatenate([[0.0], np.cumsum(m)])
        edges[-1] = 1.0
        lo, hi = float(span[0]), float(span[1])
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"span must satisfy 0 <= lo < hi <= 1, got {span}")
    elif num_samples is None:
        edges = np.concatenate([[0.0], np.cumsum(m)])
        edges[-1] = 1.0
        lo, hi = shard_index / S, (shard_index + 1) / S
    else:
        n = int(num_samples)
        if n < 0:
            raise ValueError("num_samples must be non-negative")
        sizes = [n // S + (1 if s < n % S else 0) for s in range(S)]
        if sizes[shard_index] == 0:
            return torch.zeros(m.size, dtype=torch.float32)
        quotas = _largest_remainder(m, n)
        edges = np.concatenate([[0], np.cumsum(quotas)]).astype(np.float64)
        lo = float(sum(sizes[:shard_index]))
        hi = lo + sizes[shard_index]
    overlap = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None)
    overlap[overlap < 1e-6 * (hi - lo)] = 0.0  # rounding slivers (float32 masses)
    total = overlap.sum()
    if total <= 0:
        return torch.zeros(m.size, dtype=torch.float32)
    return torch.as_tensor(overlap / total, dtype=torch.float32)


class OTEnergy:
    """Entropic-OT distribution-matching energy to a weighted support measure (paper 003).

    Parameters
    ----------
    support:
        ``[K, D]`` support points (K-means centres, :func:`kmeans_support`).
    masses:
        ``[K]`` non-negative masses (normalised internally; zero-mass points
        are dropped, see :func:`partition_masses`).
    reg:
        Entropic regularisation eps, relative to the normalised cost (paper: 0.1).
    num_iter:
        Sinkhorn iterations (paper: 5).
    cost_scale:
        ``None`` (default: the support measure's mean squared pairwise distance,
        fixed at construction), a positive float (fixed), or ``"mean"`` / ``"max"``
        (per-call detached statistic of the cost matrix).  See the module docstring.
    stop_thr:
        POT's ``stopThr`` (tiny so that exactly ``num_iter`` iterations run
        unless the marginals are already met to machine precision).
    method:
        ``"sinkhorn"`` (POT's ``sinkhorn_knopp``, paper) or ``"sinkhorn_log"``.
        With ``"sinkhorn"`` the log-domain variant is used automatically when
        ``max(C)/reg`` would underflow ``exp``.
    plan_grad:
        ``"autodiff"`` (differentiate through the iterations) or ``"envelope"``
        (plan detached; gradient ``sum_j gamma*_ij dC_ij``, the paper's formula).

    ``energy(features [B, D], frozen [M, D] | None) -> 0-d tensor``: the cost
    ``<gamma, C>`` between ``uniform(cat(frozen.detach(), features))`` and the
    support measure.  Computed in float64 on ``features``' device; returned in
    ``features``' dtype.
    """

    def __init__(
        self,
        support: ArrayLike,
        masses: ArrayLike,
        reg: float = 0.1,
        num_iter: int = 5,
        cost_scale: Union[None, float, str] = None,
        stop_thr: float = 1e-12,
        method: str = "sinkhorn",
        plan_grad: str = "autodiff",
    ):
        support = support if isinstance(support, Tensor) else torch.as_tensor(np.asarray(support))
        masses = masses if isinstance(masses, Tensor) else torch.as_tensor(np.asarray(masses))
        support = support.detach().double()
        masses = masses.detach().double().reshape(-1)
        if support.ndim != 2 or support.shape[0] != masses.shape[0]:
            raise ValueError(f"support [K, D] and masses [K] mismatch: {tuple(support.shape)}, {tuple(masses.shape)}")
        if torch.any(masses < 0) or masses.sum() <= 0:
            raise ValueError("masses must be non-negative with positive sum")
        keep = masses > 0
        self.support = support[keep].cpu()
        self.masses = (masses[keep] / masses[keep].sum()).cpu()
        if reg <= 0:
            raise ValueError("reg must be positive")
        if num_iter < 1:
            raise ValueError("num_iter must be >= 1")
        if method not in ("sinkhorn", "sinkhorn_log"):
            raise ValueError(f"unknown method {method!r}")
        if plan_grad not in ("autodiff", "envelope"):
            raise ValueError(f"unknown plan_grad {plan_grad!r}")
        if cost_scale is None:
            cost_scale = _support_cost_scale(self.support, self.masses)
        elif isinstance(cost_scale, str):
            if cost_scale not in ("mean", "max"):
                raise ValueError(f"unknown cost_scale {cost_scale!r}")
        else:
            cost_scale = float(cost_scale)
            if not (cost_scale > 0 and math.isfinite(cost_scale)):
                raise ValueError("cost_scale must be a positive finite number")
        self.cost_scale = cost_scale
        self.reg = float(reg)
        self.num_iter = int(num_iter)
        self.stop_thr = float(stop_thr)
        self.method = method
        self.plan_grad = plan_grad
        self._dev_cache: dict = {}

    @classmethod
    def from_features(
        cls,
        train_features: ArrayLike,
        K: int = 10,
        seed: int = 0,
        reg: float = 0.1,
        num_iter: int = 5,
        **kwargs,
    ) -> "OTEnergy":
        """K-means support of one class's features + cost scale ``2 tr Cov(train_features)``.

        Extra keyword arguments go to the constructor (``cost_scale`` there
        overrides the data-based scale).
        """
        support, masses = kmeans_support(train_features, K=K, seed=seed)
        kwargs.setdefault("cost_scale", cost_scale_from_features(train_features))
        return cls(support, masses, reg=reg, num_iter=num_iter, **kwargs)

    @property
    def num_support(self) -> int:
        return int(self.support.shape[0])

    def _target(self, device: torch.device) -> Tuple[Tensor, Tensor]:
        key = str(device)
        if key not in self._dev_cache:
            self._dev_cache[key] = (self.support.to(device), self.masses.to(device))
        return self._dev_cache[key]

    def cost_matrix(self, features: Tensor, frozen: Optional[Tensor] = None) -> Tensor:
        """Normalised cost ``[M + B, K]`` (float64); rows of ``frozen`` first, detached."""
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"features must be a non-empty [B, D] tensor, got {tuple(features.shape)}")
        support, _ = self._target(features.device)
        if features.shape[1] != support.shape[1]:
            raise ValueError(f"feature dim {features.shape[1]} != support dim {support.shape[1]}")
        z = features.double()
        if frozen is not None and frozen.shape[0] > 0:
            z = torch.cat([frozen.detach().to(device=features.device, dtype=torch.float64), z], 0)
        diff = z[:, None, :] - support[None, :, :]  # [n, K, D], K is small
        M = (diff * diff).sum(-1)
        if self.cost_scale == "mean":
            scale = M.detach().mean().clamp_min(1e-300)
        elif self.cost_scale == "max":
            scale = M.detach().max().clamp_min(1e-300)
        else:
            scale = self.cost_scale
        return M / scale

    def _sinkhorn_method(self, M: Tensor) -> str:
        if self.method == "sinkhorn" and float(M.detach().max()) / self.reg > _MAX_EXPONENT:
            return "sinkhorn_log"
        return self.method

    def _uniform(self, n: int, like: Tensor) -> Tensor:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=like.device)

    def plan(self, features: Tensor, frozen: Optional[Tensor] = None) -> Tensor:
        """The (detached) Sinkhorn plan ``[M + B, K]``; rows of ``frozen`` first."""
        ot = _pot()

        with torch.no_grad():
            M = self.cost_matrix(features.detach(), frozen)
            _, b = self._target(features.device)
            a = self._uniform(M.shape[0], M)
            return ot.sinkhorn(
                a, b, M, self.reg, method=self._sinkhorn_method(M),
                numItermax=self.num_iter, stopThr=self.stop_thr, warn=False,
            )

    def __call__(self, features: Tensor, frozen: Optional[Tensor] = None) -> Tensor:
        ot = _pot()

        M = self.cost_matrix(features, frozen)
        _, b = self._target(features.device)
        a = self._uniform(M.shape[0], M)
        method = self._sinkhorn_method(M)
        if self.plan_grad == "envelope":
            with torch.no_grad():
                G = ot.sinkhorn(
                    a, b, M.detach(), self.reg, method=method,
                    numItermax=self.num_iter, stopThr=self.stop_thr, warn=False,
                )
            loss = (G * M).sum()
        else:
            loss = ot.sinkhorn2(
                a, b, M, self.reg, method=method,
                numItermax=self.num_iter, stopThr=self.stop_thr, warn=False,
            )
        return loss.to(features.dtype) if features.dtype.is_floating_point else loss

    def select(self, candidates: Tensor, n: int) -> Tensor:
        """Indices of ``n`` rows of ``candidates`` [M, D] chosen greedily to lower the energy of their set.

        Each pick adds the candidate whose set with the ones already chosen is cheapest to transport onto
        the support measure (the chosen set uniform, as in the energy): the sets guidance made, chosen
        among by the same energy (``candidates: m``, docs/methods.md). O(n·M) energy evaluations of at
        most n samples each. Ties go to the lower index; same input, same indices.
        """
        if candidates.ndim != 2 or not 1 <= n <= candidates.shape[0]:
            raise ValueError(f"need 1 <= n <= {candidates.shape[0]} candidates, got n = {n}")
        y = candidates.detach().double()
        chosen: list[int] = []
        with torch.no_grad():
            for _ in range(n):
                rest = [j for j in range(y.shape[0]) if j not in chosen]
                costs = torch.stack([self(y[chosen + [j]]) for j in rest])
                chosen.append(rest[int(torch.argmin(costs))])
        return torch.tensor(chosen, dtype=torch.long)

    def __repr__(self) -> str:
        return (
            f"OTEnergy(K={self.num_support}, dim={self.support.shape[1]}, reg={self.reg}, "
            f"num_iter={self.num_iter}, cost_scale={self.cost_scale!r}, method={self.method!r}, "
            f"plan_grad={self.plan_grad!r})"
        )
