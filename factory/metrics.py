"""Evaluation metrics for synthetic feature sets, all on (N, D) feature arrays.

- PRDC (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models") and F1(P, C).
- Fréchet distance between the Gaussians fitted to two sets.
- Label agreement: how often a synthetic image's k nearest real images carry its class (a k-NN vote).
- Class-conditional Gaussian hardness H (Sehwag et al. 2022, Eq. 3), a differentiable torch function of features.
- AvgkNN and LOF neighbourhood-density scores of synthetic points relative to real ones (Sehwag et al., Sec. 4.2).
- Nearest-neighbour search and the memorisation check (Sehwag et al., Sec. 5).

Inputs are numpy arrays or torch tensors; work runs on the tensor's device (numpy: CPU). Every pairwise distance is
computed in float64 as ||a||² + ||b||² − 2 a·b over (chunk × chunk) blocks: no N × N matrix over a whole set is
ever built, each row keeps only its k smallest entries (torch.topk merged across column blocks) and the PRDC counts
are reduced block by block, so memory is O(chunk² + N·k) whatever N is. Comparisons are made on squared distances.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from factory.guidance.chamfer import pairwise_sq_dists
from factory.guidance.lowdensity import Moments, mean_cov, ridged_cholesky  # noqa: F401 (Moments: the score stage's)


def _t(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"expected an (N, D) feature matrix, got shape {tuple(x.shape)}")
    return x


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)) in float64, clamped at 0 (the guidance's own, centred)."""
    return pairwise_sq_dists(a.double(), b.to(a.device, torch.float64))


def _blocks(a: torch.Tensor, b: torch.Tensor, chunk: int):
    """Yield (i, j, squared distances of a[i:i+chunk] to b[j:j+chunk])."""
    for i in range(0, len(a), chunk):
        for j in range(0, len(b), chunk):
            yield i, j, _sqdist(a[i:i + chunk], b[j:j + chunk])


def _knn_sq(query, ref, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest squared distances from each query row to ``ref`` (ascending) and their indices into ``ref``."""
    if not 1 <= k <= len(ref):
        raise ValueError(f"k={k} needs 1 <= k <= {len(ref)} reference points")
    out_d, out_i = [], []
    for i in range(0, len(query), chunk):
        best_d = best_i = None
        for j in range(0, len(ref), chunk):
            d = _sqdist(query[i:i + chunk], ref[j:j + chunk])
            v, idx = d.topk(min(k, d.shape[1]), dim=1, largest=False)
            idx = idx + j
            if best_d is not None:
                v, idx = torch.cat([best_d, v], 1), torch.cat([best_i, idx], 1)
                v, order = v.topk(min(k, v.shape[1]), dim=1, largest=False)
                idx = idx.gather(1, order)
            best_d, best_i = v, idx
        out_d.append(best_d)
        out_i.append(best_i)
    return torch.cat(out_d), torch.cat(out_i)


def _radii_sq(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set, excluding itself
    (the (k+1)-th smallest distance including self, as in Naeem et al.'s reference code)."""
    if len(x) < k + 1:
        raise ValueError(f"k={k} nearest neighbours need at least {k + 1} points, got {len(x)}")
    return _knn_sq(x, x, k + 1, chunk)[0][:, k]


# ----------------------------------------------------------------------------------------------------------------
# PRDC, F1, Fréchet distance

@torch.no_grad()
def prdc(real, fake, k: int = 5, chunk: int = 4096) -> dict:
    """Precision, recall, density and coverage of ``fake`` (M, D) against ``real`` (N, D) (Naeem et al. 2020).

    r_i = distance of real i to its k-th nearest other real point; s_j likewise for fake j among fake.
      precision = (1/M) Σ_j 1[∃i: d(f_j, x_i) < r_i]          fake inside some real k-NN ball
      recall    = (1/N) Σ_i 1[∃j: d(x_i, f_j) < s_j]          real inside some fake k-NN ball
      density   = (1/(kM)) Σ_j Σ_i 1[d(f_j, x_i) < r_i]        real balls containing each fake, averaged, / k
      coverage  = (1/N) Σ_i 1[min_j d(x_i, f_j) < r_i]         real balls containing at least one fake
    The balls are open (strict <), exactly as in the authors' reference implementation (the `prdc` package); this
    only matters on ties, and makes identical sets give precision = recall = coverage = density = 1 (with closed
    balls each real ball would also hold its k-th neighbour, and density would be (k+1)/k). Distances in float64.
    """
    real, fake = _t(real), _t(fake)
    r2 = _radii_sq(real, k, chunk)
    s2 = _radii_sq(fake, k, chunk).to(r2.device)
    fake_in_real = torch.zeros(len(fake), dtype=torch.bool, device=r2.device)
    real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=r2.device)
    real_covered = torch.zeros(len(real), dtype=torch.bool, device=r2.device)
    hits = torch.zeros((), dtype=torch.int64, device=r2.device)
    # rows = real and the same blocking as _radii_sq(real), so identical inputs give bit-identical distances
    for i, j, d in _blocks(real, fake, chunk):
        inside = d < r2[i:i + len(d), None]  # fake j inside real ball i
        fake_in_real[j:j + d.shape[1]] |= inside.any(0)
        real_covered[i:i + len(d)] |= inside.any(1)
        hits += inside.sum()
        real_in_fake[i:i + len(d)] |= (d < s2[None, j:j + d.shape[1]]).any(1)
    return {
        "precision": fake_in_real.double().mean().item(),
        "recall": real_in_fake.double().mean().item(),
        "density": hits.item() / (k * len(fake)),
        "coverage": real_covered.double().mean().item(),
    }


@torch.no_grad()
def label_agreement(real, real_labels, fake, fake_labels, k: int = 5, chunk: int = 4096) -> float:
    """Fraction of ``fake`` rows whose k nearest ``real`` rows vote (plurality; a tie goes to the nearest of the
    tied classes) for the fake row's own label. PRDC is blind to labels: an image of the wrong class, or between
    two, still lands inside a real ball; this is the part of fidelity a classifier trained on the set feels."""
    real, fake = _t(real), _t(fake)
    real_labels = torch.as_tensor(real_labels).to(real.device).long()
    fake_labels = torch.as_tensor(fake_labels).to(real.device).long()
    if len(fake) == 0:
        return float("nan")
    votes = real_labels[_knn_sq(fake, real, k, chunk)[1]]  # (M, k), nearest first
    same = votes[:, :, None] == votes[:, None, :]
    counts = same.sum(2)  # how many of the k votes agree with each vote
    # plurality; among tied classes the one with the nearest vote: the first position holding the maximum count
    winner = votes.gather(1, counts.argmax(1, keepdim=True))[:, 0]
    return (winner == fake_labels).double().mean().item()


def f1(precision: float, coverage: float) -> float:
    """Harmonic mean 2PC / (P + C) of precision and coverage; 0 when both are 0."""
    s = precision + coverage
    return 0.0 if s <= 0 else 2.0 * precision * coverage / s


def frechet_distance(real, fake) -> float:
    """||μ_r − μ_f||² + tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^{1/2}) between Gaussians fitted to the two sets (FID's formula).

    tr (Σ_r Σ_f)^{1/2} is computed as Σ sqrt(eig(A Σ_f A)) with A = Σ_r^{1/2}, which has the same eigenvalues as
    Σ_r Σ_f but is symmetric PSD: negative round-off eigenvalues are clipped to 0, so singular or near-singular
    covariances (fewer points than dimensions) need no ε offset and no complex parts. Float64; clipped at 0.
    """
    (m1, c1), (m2, c2) = mean_cov(_t(real)), mean_cov(_t(fake))
    return frechet_from_moments(m1, c1, m2, c2)


def frechet_from_moments(m1, c1, m2, c2) -> float:
    """FID's formula from two (mean, covariance) pairs; see :func:`frechet_distance`."""
    m1, c1, m2, c2 = (torch.as_tensor(v).cpu().numpy() for v in (m1, c1, m2, c2))
    w, v = np.linalg.eigh(c1)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(a @ c2 @ a), 0, None)).sum()
    fd = float(np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2.0 * tr_sqrt)
    return max(fd, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Class-conditional Gaussian hardness

class ClassGaussian:
    """One Gaussian per class in feature space, fitted from (features (N, D), integer labels (N,)).

    Σ_y = unbiased sample covariance of class y + λ I with λ = ridge × (mean per-dimension variance of all
    features), so a class with fewer points than dimensions (or a single point: its covariance is taken as 0) is
    still well posed. With ``identity=True`` every Σ_y = I (the identity precision matrix of Sehwag et al.,
    App. A.1), i.e. H is half the squared distance to the class mean plus a constant. Parameters are float64 and
    are cast to the features' dtype and device when used. Memory: C × D² float64.
    """

    def __init__(self, features, labels, num_classes: int | None = None, ridge: float = 1e-3,
                 identity: bool = False, feature_var: float | None = None):
        x = _t(features)
        y = torch.as_tensor(labels, device=x.device).long().reshape(-1)
        if len(y) != len(x) or len(x) == 0:
            raise ValueError(f"{len(x)} features vs {len(y)} labels")
        self.num_classes = int(num_classes if num_classes is not None else y.max().item() + 1)
        if y.min() < 0 or y.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        self.dim, self.identity, self.ridge = x.shape[1], identity, ridge
        # the ridge's scale: given when the classes are fitted apart (the mean per-dimension variance of them all)
        var = mean_cov(x)[1].diagonal().mean().item() if feature_var is None else float(feature_var)
        C, D = self.num_classes, self.dim
        self.counts = torch.bincount(y, minlength=C).cpu()
        self.means = torch.full((C, D), float("nan"), dtype=torch.float64)
        self.whiten = torch.eye(D, dtype=torch.float64).repeat(C, 1, 1)  # W_y = L_y^{-1}, Σ_y = L_y L_yᵀ
        self.logdet = torch.zeros(C, dtype=torch.float64)
        for c in torch.nonzero(self.counts).flatten().tolist():
            m, cov = mean_cov(x[y == c])
            self.means[c] = m.cpu()
            if not identity:
                chol = ridged_cholesky(cov, var, ridge)
                self.whiten[c] = torch.linalg.solve_triangular(chol, torch.eye(D, dtype=torch.float64), upper=False)
                self.logdet[c] = 2.0 * chol.diagonal().log().sum()
        self._cache: dict = {}

    def _params(self, like: torch.Tensor):
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = tuple(p.to(like.device, like.dtype) for p in (self.means, self.whiten, self.logdet))
        return self._cache[key]

    def _nll(self, x: torch.Tensor, c: int) -> torch.Tensor:
        means, whiten, logdet = self._params(x)
        z = x - means[c]
        if not self.identity:
            z = z @ whiten[c].T
        return 0.5 * (z.pow(2).sum(1) + logdet[c] + self.dim * math.log(2 * math.pi))

    def hardness(self, features, labels) -> torch.Tensor:
        """H(x, y) = ½[(x − μ_y)ᵀ Σ_y⁻¹ (x − μ_y) + ln det Σ_y + D ln 2π] = −log N(x; μ_y, Σ_y), shape (N,).

        ``labels``: an int (one class for all rows) or (N,) integers. Differentiable w.r.t. ``features``; computed
        in the features' floating dtype (integer inputs become float32).
        """
        x = _t(features)
        if not x.is_floating_point():
            x = x.float()
        y = torch.as_tensor(labels, device=x.device).long().reshape(-1)
        if len(y) == 1:
            y = y.expand(len(x))
        if len(y) != len(x):
            raise ValueError(f"{len(x)} features vs {len(y)} labels")
        out = x.new_zeros(len(x))
        for c in y.unique().tolist():
            if not 0 <= c < self.num_classes or self.counts[c] == 0:
                raise ValueError(f"class {c} was not fitted")
            idx = torch.nonzero(y == c).flatten()
            out = out.index_put((idx,), self._nll(x[idx], c))
        return out

    def hardness_all(self, features) -> torch.Tensor:
        """H(x, j) for every fitted class j, shape (N, C); unfitted classes are +inf. (For Eq. 4's softmax over
        classes.) Differentiable w.r.t. ``features``."""
        x = _t(features)
        if not x.is_floating_point():
            x = x.float()
        cols = [self._nll(x, c) if self.counts[c] > 0 else x.new_full((len(x),), float("inf"))
                for c in range(self.num_classes)]
        return torch.stack(cols, 1)


# ----------------------------------------------------------------------------------------------------------------
# Neighbourhood density and memorisation

@torch.no_grad()
def nearest_neighbours(fake, train, k: int = 1, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (M, k) float64, ascending, and indices (M, k) int64 into ``train`` of each fake row's k
    nearest train rows."""
    d2, idx = _knn_sq(_t(fake), _t(train), k, chunk)
    return d2.sqrt(), idx


def avg_knn(real, fake, k: int = 5, chunk: int = 4096) -> torch.Tensor:
    """AvgkNN: mean Euclidean distance of each fake point to its k nearest real points, shape (M,) float64.
    Higher = lower-density neighbourhood."""
    return nearest_neighbours(fake, real, k, chunk)[0].mean(1)


def lof(real, fake, k: int = 20) -> np.ndarray:
    """Local outlier factor of each fake point w.r.t. the real set (Breunig et al. 2000): scikit-learn's
    LocalOutlierFactor(n_neighbors=k, novelty=True) fitted on real; returns the positive LOF (−score_samples),
    ≈1 for inliers, larger in lower-density regions than the point's neighbours. Shape (M,) float64."""
    from sklearn.neighbors import LocalOutlierFactor

    to_np = lambda a: a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)  # noqa: E731
    model = LocalOutlierFactor(n_neighbors=k, novelty=True).fit(to_np(real))
    return -model.score_samples(to_np(fake))


@torch.no_grad()
def memorisation(fake, train, top: int = 8, quantile: float = 0.01, probe: int = 10000, seed: int = 0,
                 chunk: int = 4096) -> dict:
    """Nearest-neighbour memorisation check of ``fake`` against ``train`` (Sehwag et al., Sec. 5).

    d_j = Euclidean distance of fake j to its nearest train point. The reference scale is the train–train
    nearest-neighbour distance (excluding the point itself; an exact duplicate in train counts as distance 0) of
    ``probe`` train points drawn without replacement with ``seed`` (all of train if smaller). threshold = its
    ``quantile`` (default 1st percentile); ``frac_below_threshold`` = fraction of fake with d_j <= threshold, i.e.
    closer to train than 99% of train points are to their own nearest neighbour. ``closest`` = the ``top`` fake
    points with the smallest d_j as (fake_index, train_index, distance), each fake at most once. Plain Python types.
    """
    fake, train = _t(fake), _t(train)
    if len(train) < 2:
        raise ValueError("memorisation needs at least two train points")
    d, idx = nearest_neighbours(fake, train, 1, chunk)
    d, idx = d[:, 0].cpu().numpy(), idx[:, 0].cpu().numpy()
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train), generator=g)[:probe].to(train.device)
    tt = _knn_sq(train[pick], train, 2, chunk)[0][:, 1].sqrt().cpu().numpy()
    threshold = float(np.quantile(tt, quantile))
    order = np.argsort(d, kind="stable")[:top]
    return {
        "nn_min": float(d.min()),
        "nn_median": float(np.median(d)),
        "nn_mean": float(d.mean()),
        "train_nn_median": float(np.median(tt)),
        "train_nn_mean": float(tt.mean()),
        "threshold": threshold,
        "threshold_quantile": float(quantile),
        "frac_below_threshold": float(np.mean(d <= threshold)),
        "closest": [(int(j), int(idx[j]), float(d[j])) for j in order],
    }


@torch.no_grad()
def summary(real_test_feats, real_test_labels, fake_feats, fake_labels, gaussian: ClassGaussian, k: int = 5) -> dict:
    """PRDC, F1(precision, coverage), Fréchet distance and label agreement of fake vs the real test set, mean hardness
    of fake, and the real test set's hardness mean / std (unbiased) for reference. Plain floats."""
    m = prdc(real_test_feats, fake_feats, k=k)
    m["f1_pc"] = f1(m["precision"], m["coverage"])
    m["fd"] = frechet_distance(real_test_feats, fake_feats)
    m["label_agreement"] = label_agreement(real_test_feats, real_test_labels, fake_feats, fake_labels, k=k)
    h_fake = gaussian.hardness(_t(fake_feats).double(), fake_labels)
    h_real = gaussian.hardness(_t(real_test_feats).double(), real_test_labels)
    m["hardness_mean"] = h_fake.mean().item()
    m["real_hardness_mean"] = h_real.mean().item()
    m["real_hardness_std"] = h_real.std().item() if len(h_real) > 1 else 0.0
    return {key: float(v) for key, v in m.items()}
