import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import cdist
from scipy.stats import multivariate_normal
from sklearn.neighbors import LocalOutlierFactor

from factory import metrics


def brute_prdc(real, fake, k):
    """Naeem et al. from full distance matrices (their reference code, written out with loops)."""
    d_rr, d_ff, d_rf = cdist(real, real), cdist(fake, fake), cdist(real, fake)
    r = np.sort(d_rr, axis=1)[:, k]  # k-th neighbour, index 0 is self
    s = np.sort(d_ff, axis=1)[:, k]
    n, m = len(real), len(fake)
    precision = np.mean([any(d_rf[i, j] < r[i] for i in range(n)) for j in range(m)])
    recall = np.mean([any(d_rf[i, j] < s[j] for j in range(m)) for i in range(n)])
    density = sum(d_rf[i, j] < r[i] for i in range(n) for j in range(m)) / (k * m)
    coverage = np.mean([d_rf[i].min() < r[i] for i in range(n)])
    return dict(precision=precision, recall=recall, density=density, coverage=coverage)


@pytest.mark.parametrize("n,m,d,k,chunk", [(60, 45, 3, 5, 4096), (70, 90, 8, 3, 16), (33, 50, 2, 1, 7),
                                           (40, 40, 5, 5, 40)])
def test_prdc_matches_brute_force(n, m, d, k, chunk):
    rng = np.random.default_rng(n + m)
    real = rng.normal(size=(n, d))
    fake = rng.normal(0.3, 1.2, size=(m, d)).astype(np.float32)  # mixed dtypes / types are fine
    got = metrics.prdc(real, torch.from_numpy(fake), k=k, chunk=chunk)
    want = brute_prdc(real, fake.astype(np.float64), k)
    assert set(got) == {"precision", "recall", "density", "coverage"}
    for key in want:
        assert isinstance(got[key], float)
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


@pytest.mark.parametrize("chunk", [4096, 13])
def test_prdc_identical_sets(chunk):
    x = np.random.default_rng(0).normal(size=(80, 6))
    got = metrics.prdc(x, x.copy(), k=5, chunk=chunk)
    assert got["precision"] == got["recall"] == got["coverage"] == 1.0
    assert got["density"] == pytest.approx(1.0, abs=1e-12)


def test_prdc_too_few_points():
    with pytest.raises(ValueError):
        metrics.prdc(np.zeros((5, 2)), np.zeros((10, 2)), k=5)


def test_f1():
    assert metrics.f1(0.0, 0.0) == 0.0
    assert metrics.f1(1.0, 1.0) == 1.0
    assert metrics.f1(0.5, 0.25) == pytest.approx(2 * 0.5 * 0.25 / 0.75)


def scipy_fd(a, b):
    m1, m2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    return np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * covmean)


def test_frechet_distance():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(0.5, 2.0, size=(400, 6))
    assert metrics.frechet_distance(a, b) == pytest.approx(scipy_fd(a, b), rel=1e-8)
    assert metrics.frechet_distance(a, a.copy()) == pytest.approx(0.0, abs=1e-9)
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0, 3.0])
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(np.sum(shift ** 2), rel=1e-8)
    # same shape, twice the scale: Σ_f = 4Σ → tr(Σ + 4Σ − 4Σ) = tr Σ
    assert metrics.frechet_distance(a, 2 * a) == pytest.approx(np.sum(a.mean(0) ** 2) + np.trace(np.cov(a.T)),
                                                               rel=1e-8)
    # large samples of N(0, I) vs N(μ, I) → |μ|²
    x, y = rng.normal(size=(20000, 3)), rng.normal(size=(20000, 3)) + [2.0, 0.0, 0.0]
    assert metrics.frechet_distance(x, y) == pytest.approx(4.0, abs=0.05)


def test_frechet_distance_singular():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(10, 32))  # rank-9 covariances
    b = rng.normal(size=(12, 32))
    fd = metrics.frechet_distance(a, b)
    assert np.isfinite(fd) and fd > 0
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def fitted_gaussian(identity=False):
    rng = np.random.default_rng(3)
    feats = np.concatenate([rng.normal(c, 1 + c, size=(50 + 10 * c, 4)) @ rng.normal(size=(4, 4))
                            for c in range(3)])
    labels = np.repeat(np.arange(3), [50, 60, 70])
    return feats, labels, metrics.ClassGaussian(feats, labels, ridge=1e-3, identity=identity)


def test_hardness_matches_scipy_logpdf():
    feats, labels, g = fitted_gaussian()
    lam = 1e-3 * np.cov(feats, rowvar=False).diagonal().mean()
    x = np.random.default_rng(4).normal(size=(20, 4)) * 3
    y = np.arange(20) % 3
    want = [-multivariate_normal(feats[labels == c].mean(0),
                                 np.cov(feats[labels == c], rowvar=False) + lam * np.eye(4)).logpdf(x[i])
            for i, c in enumerate(y)]
    got = g.hardness(torch.from_numpy(x), torch.from_numpy(y))
    assert got.shape == (20,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)
    allc = g.hardness_all(torch.from_numpy(x))
    np.testing.assert_allclose(allc[torch.arange(20), torch.from_numpy(y)].numpy(), want, rtol=1e-9)
    np.testing.assert_allclose(g.hardness(x, 1).numpy(), allc[:, 1].numpy(), rtol=1e-12)


def test_hardness_identity_precision_and_grad():
    feats, labels, g = fitted_gaussian(identity=True)
    x = torch.randn(7, 4, dtype=torch.float32, requires_grad=True)
    h = g.hardness(x, torch.tensor([0, 1, 2, 0, 1, 2, 0]))
    assert h.dtype == torch.float32
    mu = torch.tensor(np.stack([feats[labels == c].mean(0) for c in (0, 1, 2, 0, 1, 2, 0)]), dtype=torch.float32)
    want = -multivariate_normal(np.zeros(4), np.eye(4)).logpdf((x.detach() - mu).numpy())
    np.testing.assert_allclose(h.detach().numpy(), want, rtol=1e-5)
    h.sum().backward()  # ∂H/∂x = x − μ_y under identity precision
    np.testing.assert_allclose(x.grad.numpy(), (x.detach() - mu).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        g.hardness(x, 5)


def test_nearest_neighbours_and_avg_knn():
    rng = np.random.default_rng(5)
    train, fake = rng.normal(size=(300, 5)), rng.normal(size=(70, 5))
    d, i = metrics.nearest_neighbours(fake, train, k=4, chunk=32)
    full = cdist(fake, train)
    want_i = np.argsort(full, axis=1)[:, :4]
    np.testing.assert_array_equal(i.numpy(), want_i)
    np.testing.assert_allclose(d.numpy(), np.take_along_axis(full, want_i, 1), rtol=1e-9)
    avg = metrics.avg_knn(train, fake, k=4, chunk=50)
    np.testing.assert_allclose(avg.numpy(), np.sort(full, 1)[:, :4].mean(1), rtol=1e-9)


def test_lof_matches_sklearn():
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(200, 3)), rng.normal(size=(30, 3)) * 2
    want = -LocalOutlierFactor(n_neighbors=20, novelty=True).fit(real).score_samples(fake)
    np.testing.assert_allclose(metrics.lof(torch.from_numpy(real), fake, k=20), want)


def test_memorisation_finds_planted_copy():
    rng = np.random.default_rng(7)
    train, fake = rng.normal(size=(500, 8)), rng.normal(size=(100, 8))
    fake[37] = train[123]
    m = metrics.memorisation(fake, train, top=3, chunk=64)
    assert m["closest"][0][:2] == (37, 123) and m["closest"][0][2] < 1e-6
    assert len(m["closest"]) == 3 and m["closest"][1][2] <= m["closest"][2][2]
    assert m["nn_min"] < 1e-6 and m["frac_below_threshold"] == pytest.approx(0.01)
    assert 0 < m["threshold"] < m["train_nn_median"]
    nn = cdist(fake, train).min(1)
    assert m["nn_median"] == pytest.approx(np.median(nn)) and m["nn_mean"] == pytest.approx(nn.mean())


@pytest.mark.parametrize("chunk", [7, 4096])
def test_label_agreement_is_a_knn_vote(chunk):
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(3)
    real, real_labels = rng.normal(size=(60, 5)), rng.integers(0, 2, 60)  # two classes, k odd: no tied votes
    fake, fake_labels = rng.normal(size=(45, 5)), rng.integers(0, 2, 45)
    want = (KNeighborsClassifier(5).fit(real, real_labels).predict(fake) == fake_labels).mean()
    assert metrics.label_agreement(real, real_labels, fake, fake_labels, k=5, chunk=chunk) == pytest.approx(want)
    assert 0.2 < want < 0.8  # random labels: neither extreme, so the comparison tests the vote


def test_label_agreement_separated_classes_swapped_labels_and_ties():
    rng = np.random.default_rng(4)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    real_labels = np.repeat(np.arange(3), 20)
    real = centres[real_labels] + rng.normal(size=(60, 2))
    fake_labels = np.repeat(np.arange(3), 5)
    fake = centres[fake_labels] + rng.normal(size=(15, 2))
    assert metrics.label_agreement(real, real_labels, fake, fake_labels, k=5) == 1.0
    assert metrics.label_agreement(real, real_labels, fake, (fake_labels + 1) % 3, k=5) == 0.0
    # a 2-2 tie between classes 1 and 0: the class of the nearest vote wins
    real = np.array([[1.0], [2.0], [-1.1], [-2.1]])
    assert metrics.label_agreement(real, [1, 1, 0, 0], np.zeros((1, 1)), [1], k=4) == 1.0
    assert metrics.label_agreement(real, [0, 0, 1, 1], np.zeros((1, 1)), [1], k=4) == 0.0


def test_summary_is_plain_floats():
    import json

    feats, labels, g = fitted_gaussian()
    rng = np.random.default_rng(8)
    fake, fake_labels = rng.normal(size=(40, 4)).astype(np.float32), torch.from_numpy(rng.integers(0, 3, 40))
    s = metrics.summary(torch.from_numpy(feats), torch.from_numpy(labels), torch.from_numpy(fake), fake_labels, g, k=3)
    assert set(s) == {"precision", "recall", "density", "coverage", "f1_pc", "fd", "label_agreement", "hardness_mean",
                      "real_hardness_mean", "real_hardness_std"}
    assert all(type(v) is float for v in s.values())
    json.dumps(s)
    assert s["hardness_mean"] == pytest.approx(g.hardness(fake.astype(np.float64), fake_labels).mean().item())
