import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from factory.guidance.lowdensity import (
    FeatureDiscriminator,
    LowDensityEnergy,
    fit_class_gaussians,
    hardness,
    normalized_combination,
    precision_from_covariance,
)



def _spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    return A @ A.T + 0.5 * torch.eye(d, dtype=torch.float64)


def test_hardness_matches_scipy_logpdf():
    d = 5
    cov = _spd(d, 0)
    mu = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z = torch.randn(7, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2
    h = hardness(z, mu, torch.linalg.inv(cov))
    ref = -multivariate_normal(mu.numpy(), cov.numpy()).logpdf(z.numpy())
    assert np.allclose(h.numpy(), ref, rtol=1e-10)
    # identity precision: NLL under N(mu, I)
    h_id = hardness(z, mu, None)
    ref_id = -multivariate_normal(mu.numpy(), np.eye(d)).logpdf(z.numpy())
    assert np.allclose(h_id.numpy(), ref_id, rtol=1e-10)


def test_hardness_multi_class_shapes():
    d, C = 4, 3
    covs = torch.stack([_spd(d, s) for s in range(C)])
    mus = torch.randn(C, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    z = torch.randn(6, d, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    precs = torch.linalg.inv(covs)
    h = hardness(z, mus, precs)
    assert h.shape == (6, C)
    for c in range(C):
        ref = -multivariate_normal(mus[c].numpy(), covs[c].numpy()).logpdf(z.numpy())
        assert np.allclose(h[:, c].numpy(), ref, rtol=1e-10)
    hs = hardness(z, mus, precs[0])  # shared precision
    for c in range(C):
        ref = -multivariate_normal(mus[c].numpy(), covs[0].numpy()).logpdf(z.numpy())
        assert np.allclose(hs[:, c].numpy(), ref, rtol=1e-10)


def test_fit_class_gaussians():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (200, 3)), rng.normal(5, 2, (300, 3))])
    y = np.array([0] * 200 + [1] * 300)
    means, precs = fit_class_gaussians(X, y, ridge=0.0)
    assert means.shape == (2, 3) and precs.shape == (2, 3, 3)
    assert np.allclose(means[1].numpy(), X[200:].mean(0), atol=1e-5)
    assert np.allclose(torch.linalg.inv(precs[1].double()).numpy(), np.cov(X[200:].T), rtol=1e-4)
    m2, p2 = fit_class_gaussians(X, y, identity_precision=True)
    assert p2 is None and torch.equal(m2, means)
    _, ps = fit_class_gaussians(X, y, shared_covariance=True)
    assert ps.shape == (3, 3)


def test_a_stored_covariance_gives_the_fitted_precision():
    """The reference bank stores each class's covariance apart; its precision must be the fitted one."""
    rng = np.random.default_rng(1)
    X = np.concatenate([rng.normal(0, 1, (40, 5)), rng.normal(3, 2, (4, 5))])  # class 1: fewer points than D
    y = np.array([0] * 40 + [1] * 4)
    _, precs = fit_class_gaussians(X, y)
    var = float(X.var(axis=0, ddof=1).mean())
    for c in (0, 1):
        stored = precision_from_covariance(np.cov(X[y == c].T), var)
        assert torch.allclose(stored.float(), precs[c], rtol=1e-5)
    with pytest.raises(torch.linalg.LinAlgError):
        precision_from_covariance(-np.eye(5), var)


def test_contrastive_term_is_eq4():
    d, C = 3, 4
    mus = torch.randn(C, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    covs = torch.stack([_spd(d, s) for s in range(C)])
    precs = torch.linalg.inv(covs)
    z = torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tau, label = 2.0, 2
    e = LowDensityEnergy(mus, precs, alpha=1.0, beta=0.0, tau=tau, label=label)
    H = torch.stack(
        [torch.as_tensor(-multivariate_normal(mus[c].numpy(), covs[c].numpy()).logpdf(z.numpy())) for c in range(C)], 1
    )
    L = H[:, label] / tau - torch.logsumexp(H / tau, dim=1)
    t = e.terms(z)
    assert set(t) == {"hard"}
    assert torch.allclose(t["hard"], -L.mean())
    assert torch.allclose(e(z), -L.mean())
    assert torch.allclose(e.hardness(z), H[:, label])
    # per-sample labels
    labels = torch.tensor([0, 1, 2, 3, 2])
    e2 = LowDensityEnergy(mus, precs, alpha=1.0, tau=tau, label=labels)
    L2 = (H / tau).gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(H / tau, 1)
    assert torch.allclose(e2.terms(z)["hard"], -L2.mean())


def test_single_class_descent_increases_hardness():
    mu = torch.zeros(4)
    e = LowDensityEnergy(mu, None, alpha=1.0, tau=1.0)
    z = torch.full((3, 4), 0.5, requires_grad=True)
    h0 = e.hardness(z).detach()
    (g,) = torch.autograd.grad(e(z), z)
    z1 = z.detach() - 0.1 * g
    assert (e.hardness(z1) > h0).all()  # pushed to lower density


def _two_gaussians(n=400, d=6, shift=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n, d, generator=g)
    fake = torch.randn(n, d, generator=g)
    fake[:, 0] += shift
    return real, fake


def test_discriminator_separates_and_is_deterministic():
    real, fake = _two_gaussians()
    disc = FeatureDiscriminator(6, hidden=(32,)).fit(real, fake, epochs=30, seed=0, batch_size=128)
    real_t, fake_t = _two_gaussians(seed=1)
    assert disc.accuracy(real_t, fake_t) > 0.85  # Bayes: Phi(1.5) = 0.93
    assert disc.log_prob_real(real_t).mean() > disc.log_prob_real(fake_t).mean()
    disc2 = FeatureDiscriminator(6, hidden=(32,)).fit(real, fake, epochs=30, seed=0, batch_size=128)
    assert torch.equal(disc(real_t), disc2(real_t))
    logreg = FeatureDiscriminator(6, hidden=()).fit(real, fake, epochs=30, seed=0)
    assert logreg.accuracy(real_t, fake_t) > 0.85


def test_energy_with_discriminator_and_normalized_combination():
    real, fake = _two_gaussians()
    disc = FeatureDiscriminator(6, hidden=(32,)).fit(real, fake, epochs=20, seed=0)
    e = LowDensityEnergy(torch.zeros(6), None, alpha=0.5, beta=0.3, discriminator=disc)
    z = fake[:8].clone().requires_grad_(True)
    t = e.terms(z)
    assert set(t) == {"hard", "disc"} and e.weights == {"hard": 0.5, "disc": 0.3}
    assert torch.allclose(t["disc"], -disc.log_prob_real(z).mean())
    assert torch.allclose(e(z), 0.5 * t["hard"] + 0.3 * t["disc"])
    grads = {k: torch.autograd.grad(v, z, retain_graph=True)[0] for k, v in t.items()}
    comb = normalized_combination(grads, e.weights)
    gh = grads["hard"] / grads["hard"].abs().amax(1, keepdim=True)
    gd = grads["disc"] / grads["disc"].abs().amax(1, keepdim=True)
    assert torch.allclose(comb, 0.5 * gh + 0.3 * gd)
    # descending the disc term makes samples look more real
    z1 = z.detach() - 0.5 * gd
    assert disc.log_prob_real(z1).mean() > disc.log_prob_real(z.detach()).mean()
    comb_l2 = normalized_combination(grads, {"hard": 1.0}, norm="l2")
    assert torch.allclose(comb_l2.norm(dim=1), torch.ones(8))


def test_validation_errors():
    with pytest.raises(ValueError):
        LowDensityEnergy(torch.zeros(3, 4), None)  # label missing
    with pytest.raises(ValueError):
        LowDensityEnergy(torch.zeros(4), torch.eye(3))
