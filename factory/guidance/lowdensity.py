"""Low-density guidance energies (paper 001: Sehwag et al., "Generating High Fidelity Data from Low-density
Regions using Diffusion Models", CVPR 2022).

alpha term (Eq. 4): the contrastive log-softmax over classes of the hardness H(z, y), the class Gaussian's
negative log-likelihood (Eq. 3); beta term (Eq. 6): a real-vs-synthetic discriminator's log p(real | z).
The paper normalises each term's gradient separately (unit l_inf per sample) before weighting them
(:func:`normalized_combination`, per image as the paper prescribes). tau, the single-class mode, the precision
and the discriminator (a small MLP on features) are our choices: docs/methods.md.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "hardness",
    "fit_class_gaussians",
    "mean_cov",
    "Moments",
    "ridged_cholesky",
    "precision_from_covariance",
    "FeatureDiscriminator",
    "LowDensityEnergy",
    "normalized_combination",
]

ArrayLike = Union[Tensor, np.ndarray]
_LOG_2PI = math.log(2.0 * math.pi)


def _as_tensor(x: ArrayLike) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    dt = torch.float32
    for t in ts:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def _logdet_cov_from_precision(precision: Optional[Tensor]) -> Tensor:
    """``ln det Sigma = -ln det P`` (shape [] or [C]); 0 for identity (None)."""
    if precision is None:
        return torch.zeros(())
    sign, logabs = torch.linalg.slogdet(precision.double())
    if torch.any(sign <= 0):
        raise ValueError("precision matrix must be positive definite")
    return (-logabs).to(precision.dtype)


def _quad_form(z: Tensor, mean: Tensor, precision: Optional[Tensor]) -> Tensor:
    """Mahalanobis terms ``(z_b - mu_c)^T P_c (z_b - mu_c)`` as [B, C] for mean [C, D]."""
    if precision is None:
        # |z|^2 - 2 z.mu + |mu|^2, centred for accuracy
        c = mean.detach().mean(0, keepdim=True)
        zc, mc = z - c, mean - c
        q = (zc * zc).sum(-1, keepdim=True) - 2.0 * zc @ mc.T + (mc * mc).sum(-1)[None, :]
        return q.clamp_min(0.0)
    if precision.ndim == 2:
        zp = z @ precision  # [B, D]
        mp = mean @ precision  # [C, D]
        q = (zp * z).sum(-1, keepdim=True) - 2.0 * zp @ mean.T + (mp * mean).sum(-1)[None, :]
        return q.clamp_min(0.0)
    diff = z[:, None, :] - mean[None, :, :]  # [B, C, D]
    return torch.einsum("bcd,cde,bce->bc", diff, precision, diff)


def hardness(
    features: Tensor,
    mean: Tensor,
    precision: Optional[Tensor] = None,
    logdet_cov: Optional[Tensor] = None,
) -> Tensor:
    """Hardness score (paper 001, Eq. 3) = Gaussian negative log-likelihood.

    ``features`` [B, D]; ``mean`` [D] (returns [B]) or [C, D] (returns [B, C]);
    ``precision`` = Sigma^-1: ``None`` (identity), [D, D] (shared) or [C, D, D].
    ``logdet_cov`` (``ln det Sigma``, [] or [C]) is computed from ``precision``
    when not given.  Equals ``-scipy.stats.multivariate_normal.logpdf``.
    """
    single = mean.ndim == 1
    means = mean[None, :] if single else mean
    if precision is not None and precision.ndim == 3 and precision.shape[0] != means.shape[0]:
        raise ValueError("per-class precision must have one matrix per mean")
    dt = _compute_dtype(features, means, precision)
    z = features.to(dt)
    means = means.to(device=z.device, dtype=dt)
    P = None if precision is None else precision.to(device=z.device, dtype=dt)
    if logdet_cov is None:
        logdet_cov = _logdet_cov_from_precision(P)
    logdet_cov = logdet_cov.to(device=z.device, dtype=dt)
    D = z.shape[-1]
    h = 0.5 * (_quad_form(z, means, P) + logdet_cov + D * _LOG_2PI)
    return h[:, 0] if single else h


def fit_class_gaussians(
    features: ArrayLike,
    labels: ArrayLike,
    num_classes: Optional[int] = None,
    identity_precision: bool = False,
    shared_covariance: bool = False,
    ridge: float = 1e-3,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-class Gaussian model of features (paper 001, Sec. 3.2.1).

    Returns ``(means [C, D], precisions)`` where ``precisions`` is ``None`` with
    ``identity_precision=True`` (paper's sampling-time choice, Appendix A.1),
    ``[D, D]`` with ``shared_covariance=True`` (pooled within-class covariance),
    otherwise ``[C, D, D]``.

    ``Sigma_y`` = unbiased sample covariance of class y (0 for a single point)
    ``+ lambda I`` with ``lambda = ridge * mean per-dimension variance of all
    features`` -- the same regularisation as ``factory.metrics.ClassGaussian``
    so that guidance optimises the hardness the metrics report (ours: the paper
    uses the plain sample covariance, singular when N_class <= D).  Classes
    without samples get a zero mean and the pooled covariance (avoid them).
    float64 math, float32 output.
    """
    X = _as_tensor(features).detach().double().cpu()
    y = _as_tensor(labels).detach().long().cpu().reshape(-1)
    if X.ndim != 2 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError("features [N, D] and labels [N] mismatch")
    C = int(num_classes) if num_classes is not None else int(y.max()) + 1
    N, D = X.shape
    means = torch.zeros(C, D, dtype=torch.float64)
    covs = torch.zeros(C, D, D, dtype=torch.float64)
    pooled = torch.zeros(D, D, dtype=torch.float64)
    counts = torch.bincount(y, minlength=C)
    for c in torch.nonzero(counts).flatten().tolist():
        means[c], covs[c] = mean_cov(X[y == c])
        pooled += (int(counts[c]) - 1) * covs[c]
    pooled = pooled / max(N - int((counts > 0).sum()), 1)
    if identity_precision:
        return means.float(), None
    var = float(mean_cov(X)[1].diagonal().mean())
    if shared_covariance:
        return means.float(), precision_from_covariance(pooled, var, ridge).float()
    precs = torch.stack([precision_from_covariance(covs[c] if counts[c] > 0 else pooled, var, ridge)
                         for c in range(C)])
    return means.float(), precs.float()


def mean_cov(x: Tensor, chunk: int = 65536) -> Tuple[Tensor, Tensor]:
    """Float64 mean and unbiased (N − 1) covariance of the rows of ``x`` (on the CPU), summed in row chunks
    around the first chunk's mean for stability (:class:`Moments`). The covariance of fewer than two points is
    zero. The one home of these moments: the class Gaussians here and ``factory.metrics`` (FD, hardness)."""
    m = Moments(x.shape[1], shift=x[:chunk].double().mean(0).cpu())
    for i in range(0, x.shape[0], chunk):
        m.add(x[i:i + chunk])
    return m.mean_cov()


class Moments:
    """Streamed sufficient statistics of a feature set (count, sum, sum of outer products, float64, around a
    fixed shift for stability): sets of any size are summed in parts and merged, in memory O(D²)."""

    def __init__(self, dim: int, shift=None):
        self.n = 0
        self.shift = torch.zeros(dim, dtype=torch.float64) if shift is None else torch.as_tensor(shift).double()
        self.s1 = torch.zeros(dim, dtype=torch.float64)
        self.s2 = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, x) -> "Moments":
        y = _as_tensor(x).double().cpu() - self.shift
        self.n += len(y)
        self.s1 += y.sum(0)
        self.s2 += y.T @ y
        return self

    def merge(self, other: "Moments") -> "Moments":
        if not torch.equal(self.shift, other.shift):
            raise ValueError("moments around different shifts")
        self.n += other.n
        self.s1 += other.s1
        self.s2 += other.s2
        return self

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.s1 / max(self.n, 1)
        cov = (self.s2 - self.n * torch.outer(m, m)) / (self.n - 1) if self.n > 1 else torch.zeros_like(self.s2)
        return self.shift + m, (cov + cov.T) / 2


def ridged_cholesky(cov: ArrayLike, feature_var: float, ridge: float = 1e-3) -> Tensor:
    """The lower Cholesky factor L of ``cov + lambda I`` in float64, ``lambda = ridge * feature_var`` (1.0
    when that is 0): the one ridge of the class Gaussians, so guidance optimises the hardness the metrics
    report (``factory.metrics.ClassGaussian`` whitens with L⁻¹; the precision here is (L Lᵀ)⁻¹)."""
    cov = _as_tensor(cov).detach().double().cpu()
    lam = ridge * (feature_var if feature_var > 0 else 1.0)
    return torch.linalg.cholesky(cov + lam * torch.eye(cov.shape[-1], dtype=torch.float64))


def precision_from_covariance(cov: ArrayLike, feature_var: float, ridge: float = 1e-3) -> Tensor:
    """``(cov + lambda I)^-1`` in float64 (see :func:`ridged_cholesky`), for a covariance stored apart from its
    features (the reference bank's) or fitted by :func:`fit_class_gaussians`."""
    return torch.cholesky_inverse(ridged_cholesky(cov, feature_var, ridge))


class FeatureDiscriminator(nn.Module):
    """Real(1)-vs-synthetic(0) classifier on feature vectors (paper 001, Sec. 3.2.2).

    A small MLP (``hidden=(256,)``, SiLU so its input-gradients are smooth) or,
    with ``hidden=()``, logistic regression.  Inputs are standardised with the
    mean/std of the data seen by :meth:`fit`.  ``forward`` returns the real-vs-
    fake logit [B]; :meth:`log_prob_real` its ``log sigmoid``.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (256,)):
        super().__init__()
        self.in_dim = int(in_dim)
        self.hidden = tuple(int(h) for h in hidden)
        dims = (self.in_dim,) + self.hidden + (1,)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.register_buffer("feat_mean", torch.zeros(self.in_dim))
        self.register_buffer("feat_std", torch.ones(self.in_dim))
        self.reset_parameters(seed=0)

    def reset_parameters(self, seed: int = 0) -> None:
        """PyTorch's default Linear init, drawn from a private seeded generator."""
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for lin in self.layers:
                bound = 1.0 / math.sqrt(lin.in_features)
                w = (torch.rand(lin.weight.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound
                b = (torch.rand(lin.bias.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound
                lin.weight.copy_(w.to(lin.weight))
                lin.bias.copy_(b.to(lin.bias))

    def forward(self, features: Tensor) -> Tensor:
        p = self.layers[0].weight
        h = (features.to(device=p.device, dtype=p.dtype) - self.feat_mean) / self.feat_std
        for i, lin in enumerate(self.layers):
            h = lin(h)
            if i < len(self.layers) - 1:
                h = F.silu(h)
        return h.squeeze(-1)

    def log_prob_real(self, features: Tensor) -> Tensor:
        """``log p(real | z)`` per row, [B]."""
        return F.logsigmoid(self(features))

    def fit(
        self,
        real_feats: ArrayLike,
        fake_feats: ArrayLike,
        epochs: int = 50,
        seed: int = 0,
        lr: float = 1e-2,
        batch_size: int = 256,
        weight_decay: float = 1e-4,
    ) -> "FeatureDiscriminator":
        """Train with class-balanced BCE and Adam; deterministic for a given ``seed``.

        Parameters are re-initialised from ``seed``; mini-batch order comes from
        a private generator seeded with ``seed``.  Runs on the module's device.
        Leaves the module in eval mode with ``requires_grad=False`` parameters
        (the sampler only needs gradients w.r.t. the input features).  Returns
        ``self``; the last epoch's mean loss is in ``self.last_loss``.
        """
        dev = self.layers[0].weight.device
        real = _as_tensor(real_feats).detach().float().to(dev)
        fake = _as_tensor(fake_feats).detach().float().to(dev)
        if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != self.in_dim or fake.shape[1] != self.in_dim:
            raise ValueError("real/fake features must be [N, in_dim]")
        if real.shape[0] == 0 or fake.shape[0] == 0:
            raise ValueError("need both real and fake features")
        X = torch.cat([real, fake], 0)
        y = torch.cat([torch.ones(real.shape[0]), torch.zeros(fake.shape[0])]).to(dev)
        w = torch.cat(
            [torch.full((real.shape[0],), 0.5 / real.shape[0]), torch.full((fake.shape[0],), 0.5 / fake.shape[0])]
        ).to(dev) * X.shape[0]
        with torch.no_grad():
            self.feat_mean.copy_(X.mean(0))
            self.feat_std.copy_(X.std(0, unbiased=False).clamp_min(1e-6))
        self.reset_parameters(seed)
        for p in self.parameters():
            p.requires_grad_(True)
        self.train()
        opt = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)
        g = torch.Generator().manual_seed(int(seed))
        n = X.shape[0]
        bs = max(1, min(int(batch_size), n))
        last = float("nan")
        for _ in range(int(epochs)):
            perm = torch.randperm(n, generator=g).to(dev)
            tot, cnt = 0.0, 0
            for s in range(0, n, bs):
                idx = perm[s : s + bs]
                logit = self(X[idx])
                loss = (F.binary_cross_entropy_with_logits(logit, y[idx], reduction="none") * w[idx]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * idx.numel()
                cnt += idx.numel()
            last = tot / max(cnt, 1)
        self.last_loss = last
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    @torch.no_grad()
    def accuracy(self, real_feats: ArrayLike, fake_feats: ArrayLike) -> float:
        """Balanced accuracy (mean of per-class accuracies) at threshold 0."""
        real = _as_tensor(real_feats).float()
        fake = _as_tensor(fake_feats).float()
        acc_r = (self(real) > 0).float().mean().item()
        acc_f = (self(fake) <= 0).float().mean().item()
        return 0.5 * (acc_r + acc_f)


class LowDensityEnergy:
    """alpha/beta low-density guidance energy for one class (paper 001).

    Parameters
    ----------
    mean:
        ``[D]`` (this class only; contrastive term degenerates to ``-H/tau``) or
        ``[C, D]`` (all classes; then ``label`` selects this class and Eq. 4 is
        used exactly).
    precision:
        ``None`` (identity; the paper's sampling-time choice), ``[D, D]``, or
        ``[C, D, D]`` (only with ``[C, D]`` means).
    alpha, beta:
        Weights of the hardness and discriminator terms (paper searches [0.01, 1]).
    discriminator:
        A fitted :class:`FeatureDiscriminator` (or any module mapping [B, D]
        features to real-vs-fake logits [B]); ``None`` disables the beta term.
        It is moved (in place) to the features' device on first use.
    tau:
        Temperature of Eq. 4 (not given in the paper; default 1.0).
    label:
        Class index (int or LongTensor [B]) into ``mean`` when it is [C, D].
    disc_tau:
        Temperature of Eq. 6 applied to the discriminator logit (default 1.0).

    ``terms(features)`` -> ``{"hard": term_hard, "disc": term_disc}`` (``"disc"``
    only with a discriminator); ``weights`` -> ``{"hard": alpha, "disc": beta}``;
    ``energy(features, frozen=None)`` -> ``alpha*term_hard + beta*term_disc``.
    See the module docstring for the normalised combination the sampler should use.
    """

    def __init__(
        self,
        mean: ArrayLike,
        precision: Optional[ArrayLike] = None,
        alpha: float = 0.5,
        beta: float = 0.0,
        discriminator: Optional[nn.Module] = None,
        tau: float = 1.0,
        label: Union[None, int, Tensor] = None,
        disc_tau: float = 1.0,
    ):
        mean = _as_tensor(mean).detach()
        if mean.ndim not in (1, 2):
            raise ValueError("mean must be [D] or [C, D]")
        P = None if precision is None else _as_tensor(precision).detach()
        D = mean.shape[-1]
        if P is not None:
            if P.shape[-2:] != (D, D) or P.ndim not in (2, 3):
                raise ValueError(f"precision must be [D, D] or [C, D, D], got {tuple(P.shape)}")
            if P.ndim == 3 and (mean.ndim != 2 or P.shape[0] != mean.shape[0]):
                raise ValueError("per-class precision needs [C, D] means with the same C")
        if mean.ndim == 2:
            if label is None:
                if mean.shape[0] != 1:
                    raise ValueError("label is required when mean holds several classes")
                label = 0
            lab = torch.as_tensor(label).long()
            if torch.any(lab < 0) or torch.any(lab >= mean.shape[0]):
                raise ValueError("label out of range")
            self.label = lab
        else:
            self.label = None
        if tau <= 0 or disc_tau <= 0:
            raise ValueError("temperatures must be positive")
        self.mean = mean
        self.precision = P
        self.logdet_cov = _logdet_cov_from_precision(P)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.discriminator = discriminator
        self.tau = float(tau)
        self.disc_tau = float(disc_tau)
        self._cache: dict = {}

    @property
    def weights(self) -> Dict[str, float]:
        w = {"hard": self.alpha}
        if self.discriminator is not None:
            w["disc"] = self.beta
        return w

    def _params(self, features: Tensor) -> Tuple[Tensor, Optional[Tensor], Tensor]:
        """mean / precision / logdet on ``features``' device in the compute dtype (cached)."""
        dt = _compute_dtype(features, self.mean, self.precision)
        key = (str(features.device), dt)
        if key not in self._cache:
            P = None if self.precision is None else self.precision.to(device=features.device, dtype=dt)
            self._cache[key] = (
                self.mean.to(device=features.device, dtype=dt),
                P,
                self.logdet_cov.to(device=features.device, dtype=dt),
            )
        return self._cache[key]

    def _all_hardness(self, features: Tensor) -> Tensor:
        mean, P, logdet = self._params(features)
        return hardness(features, mean, P, logdet)

    def hardness(self, features: Tensor) -> Tensor:
        """H(z, y) for this class, [B] (Eq. 3)."""
        h = self._all_hardness(features)
        if self.mean.ndim == 1:
            return h
        lab = self.label.to(h.device)
        if lab.ndim == 0:
            return h[:, lab]
        return h.gather(1, lab.reshape(-1, 1)).squeeze(1)

    def contrastive(self, features: Tensor) -> Tensor:
        """L_g1 per sample, [B] (Eq. 4; to be maximised).  ``H/tau`` in single-class mode."""
        h = self._all_hardness(features)
        if self.mean.ndim == 1:
            return h / self.tau
        logp = torch.log_softmax(h / self.tau, dim=1)
        lab = self.label.to(h.device)
        if lab.ndim == 0:
            return logp[:, lab]
        return logp.gather(1, lab.reshape(-1, 1)).squeeze(1)

    def terms(self, features: Tensor, frozen: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Separate energy scalars (lower is better): ``hard`` = -mean L_g1, ``disc`` = -mean log p(real)."""
        out = {"hard": -self.contrastive(features).mean()}
        if self.discriminator is not None:
            disc = self.discriminator
            p = next(disc.parameters(), None)
            if p is not None and p.device != features.device:
                disc.to(features.device)
            logit = disc(features)
            out["disc"] = -F.logsigmoid(logit / self.disc_tau).mean().to(out["hard"].dtype)
        return out

    def __call__(self, features: Tensor, frozen: Optional[Tensor] = None) -> Tensor:
        t = self.terms(features)
        e = self.alpha * t["hard"]
        if "disc" in t:
            e = e + self.beta * t["disc"]
        return e.to(features.dtype) if features.dtype.is_floating_point else e

    def __repr__(self) -> str:
        C = 1 if self.mean.ndim == 1 else self.mean.shape[0]
        return (
            f"LowDensityEnergy(classes={C}, dim={self.mean.shape[-1]}, alpha={self.alpha}, beta={self.beta}, "
            f"tau={self.tau}, precision={'identity' if self.precision is None else tuple(self.precision.shape)}, "
            f"discriminator={'yes' if self.discriminator is not None else 'no'})"
        )


def normalized_combination(
    grads: Mapping[str, Tensor],
    weights: Mapping[str, float],
    norm: str = "linf",
    per_sample: bool = True,
    eps: float = 1e-12,
) -> Tensor:
    """``sum_k weights[k] * grads[k] / ||grads[k]||`` (paper 001, Eq. 7 / Algorithm 1).

    ``grads`` are the gradients of the separate energy terms w.r.t. x_t (all the
    same shape, leading dim = batch).  ``norm``: ``"linf"`` (Appendix A.4,
    default) or ``"l2"``.  ``per_sample=True`` normalises each sample's
    gradient separately (the paper samples image by image).  Zero gradients
    stay zero.  The result is a descent direction for the energies.
    """
    out = None
    for k, w in weights.items():
        if k not in grads or w == 0:
            continue
        g = grads[k]
        flat = g.reshape(g.shape[0], -1) if (per_sample and g.ndim > 0) else g.reshape(1, -1)
        if norm == "linf":
            n = flat.abs().amax(dim=1)
        elif norm == "l2":
            n = flat.norm(dim=1)
        else:
            raise ValueError(f"unknown norm {norm!r}")
        shape = (-1,) + (1,) * (g.ndim - 1) if (per_sample and g.ndim > 0) else ()
        gn = g / n.clamp_min(eps).reshape(shape)
        out = w * gn if out is None else out + w * gn
    if out is None:
        ref = next(iter(grads.values()))
        return torch.zeros_like(ref)
    return out
