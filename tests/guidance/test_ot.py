import numpy as np
import ot as pot
import pytest
import torch

from factory.guidance.ot import (
    DMGD_OT_WINDOW,
    OTEnergy,
    cost_scale_from_features,
    in_ot_window,
    kmeans_support,
    partition_masses,
)



def _blobs(n=300, d=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=5.0, size=(3, d))
    lab = rng.integers(0, 3, size=n)
    return centers[lab] + rng.normal(size=(n, d))


def _problem(seed=0, n=6, k=4, d=3):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g, dtype=torch.float64)
    support = torch.randn(k, d, generator=g, dtype=torch.float64)
    masses = torch.rand(k, generator=g, dtype=torch.float64) + 0.2
    return feats, support, masses / masses.sum()


def test_value_matches_pot_numpy():
    feats, support, masses = _problem()
    e = OTEnergy(support, masses, reg=0.1, num_iter=5, cost_scale=2.5)
    M = pot.dist(feats.numpy(), support.numpy(), metric="sqeuclidean") / 2.5
    a = np.full(feats.shape[0], 1.0 / feats.shape[0])
    ref = pot.sinkhorn2(a, masses.numpy(), M, 0.1, method="sinkhorn", numItermax=5, stopThr=1e-12)
    assert np.isclose(e(feats).item(), float(ref), rtol=1e-10)
    # float32 features: same value to float32 precision, returned as float32
    v32 = e(feats.float())
    assert v32.dtype == torch.float32 and np.isclose(v32.item(), float(ref), rtol=1e-5)


def test_default_cost_scale_is_support_spread():
    feats, support, masses = _problem(seed=1)
    e = OTEnergy(support, masses)
    mu = (masses[:, None] * support).sum(0)
    spread = 2 * (masses * ((support - mu) ** 2).sum(1)).sum()
    assert np.isclose(e.cost_scale, spread.item())
    d2 = ((support[:, None] - support[None]) ** 2).sum(-1)
    assert np.isclose(spread.item(), (masses[:, None] * masses[None] * d2).sum().item())


def test_approaches_emd_for_small_reg():
    feats, support, masses = _problem(seed=2, n=8, k=5)
    M = pot.dist(feats.numpy(), support.numpy(), metric="sqeuclidean")
    a = np.full(feats.shape[0], 1.0 / feats.shape[0])
    emd = pot.emd2(a, masses.numpy(), M)
    errs = []
    for reg in (0.1, 0.01, 0.002):
        e = OTEnergy(support, masses, reg=reg, num_iter=20000, cost_scale=1.0, method="sinkhorn_log", stop_thr=1e-13)
        errs.append(abs(e(feats).item() - emd))
    assert errs[0] > errs[-1]
    assert errs[-1] < 1e-2 * emd


def test_gradient_finite_differences():
    feats, support, masses = _problem(seed=3, n=5, k=3)
    feats.requires_grad_(True)
    frozen = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    e = OTEnergy(support, masses, reg=0.1, num_iter=5, cost_scale=3.0)
    assert torch.autograd.gradcheck(lambda f: e(f), (feats,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda f: e(f, frozen), (feats,), eps=1e-6, atol=1e-6)


def test_envelope_gradient_is_plan_weighted():
    feats, support, masses = _problem(seed=4)
    feats.requires_grad_(True)
    e = OTEnergy(support, masses, reg=0.1, num_iter=5, cost_scale=2.0, plan_grad="envelope")
    auto = OTEnergy(support, masses, reg=0.1, num_iter=5, cost_scale=2.0)
    v = e(feats)
    assert torch.allclose(v, auto(feats))
    (g,) = torch.autograd.grad(v, feats)
    G = e.plan(feats)
    expected = 2.0 * (G.sum(1, keepdim=True) * feats.detach() - G @ support) / 2.0
    assert torch.allclose(g, expected, atol=1e-12)


def test_frozen_measure_and_no_grad_to_frozen():
    feats, support, masses = _problem(seed=5)
    frozen = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    e = OTEnergy(support, masses, cost_scale=1.5)
    both = torch.cat([frozen.detach(), feats])
    assert torch.allclose(e(feats, frozen), e(both))
    f = feats.clone().requires_grad_(True)
    e(f, frozen).backward()
    assert frozen.grad is None and f.grad is not None
    assert e.plan(feats, frozen).shape == (9, 4)


def test_far_features_fall_back_to_log_domain():
    feats, support, masses = _problem(seed=6)
    e = OTEnergy(support, masses, cost_scale=1.0)
    far = (feats + 100.0).requires_grad_(True)
    v = e(far)
    (g,) = torch.autograd.grad(v, far)
    assert torch.isfinite(v) and torch.isfinite(g).all()


def test_zero_mass_points_dropped():
    feats, support, masses = _problem(seed=7)
    m = masses.clone()
    m[1] = 0.0
    e = OTEnergy(support, m, cost_scale=1.0)
    keep = [0, 2, 3]
    e2 = OTEnergy(support[keep], m[keep], cost_scale=1.0)
    assert e.num_support == 3 and torch.allclose(e(feats), e2(feats))


def test_kmeans_support_masses_and_determinism():
    X = _blobs()
    s1, m1 = kmeans_support(X, K=10, seed=0)
    s2, m2 = kmeans_support(torch.as_tensor(X), K=10, seed=0)
    assert s1.shape == (10, 4) and m1.shape == (10,)
    assert np.isclose(m1.sum().item(), 1.0, atol=1e-6) and (m1 > 0).all()
    assert torch.equal(s1, s2) and torch.equal(m1, m2)
    assert (m1[:-1] >= m1[1:]).all()  # ordered by decreasing mass
    s3, m3 = kmeans_support(X[:4], K=10, seed=0)  # fewer points than K
    assert s3.shape[0] == 4 and np.isclose(m3.sum().item(), 1.0)
    s4, m4 = kmeans_support(X, K=1)
    assert np.allclose(s4[0].numpy(), X.mean(0), atol=1e-5) and m4.item() == 1.0


def test_from_features_and_cost_scale():
    X = _blobs(seed=1)
    e = OTEnergy.from_features(X, K=5, seed=0)
    assert e.num_support == 5 and e.reg == 0.1 and e.num_iter == 5
    d2 = ((X[:, None] - X[None]) ** 2).sum(-1)
    assert np.isclose(cost_scale_from_features(X), d2.mean(), rtol=1e-10)
    assert np.isclose(e.cost_scale, d2.mean())
    # OT to own data is small compared to a shifted copy
    Xt = torch.as_tensor(X[:64], dtype=torch.float32)
    assert e(Xt) < e(Xt + 5.0)


def test_partition_masses():
    m = torch.tensor([0.5, 0.3, 0.2])
    parts = [partition_masses(m, 2, s) for s in range(2)]
    assert torch.allclose(0.5 * parts[0] + 0.5 * parts[1], m)
    assert torch.allclose(parts[0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(parts[1], torch.tensor([0.0, 0.6, 0.4]))
    # quantised: 10 samples over 3 shards of sizes 4, 3, 3; quotas 5, 3, 2
    n = 10
    sizes = [4, 3, 3]
    parts = [partition_masses(m, 3, s, num_samples=n) for s in range(3)]
    for p in parts:
        assert np.isclose(p.sum().item(), 1.0)
    total = sum(sz * p for sz, p in zip(sizes, parts))
    assert torch.allclose(total, torch.tensor([5.0, 3.0, 2.0]))
    assert torch.equal(partition_masses(m, 3, 1, num_samples=n), parts[1])
    # more shards than samples: empty shards get zeros
    assert partition_masses(m, 4, 3, num_samples=2).sum() == 0
    with pytest.raises(ValueError):
        partition_masses(m, 2, 2)


def test_ot_window():
    assert DMGD_OT_WINDOW == (0.6, 0.9)
    assert in_ot_window(0.75) and in_ot_window(0.9) and not in_ot_window(0.95) and not in_ot_window(0.5)


def test_select_picks_greedily_by_the_energy_and_beats_the_first_draw():
    g = torch.Generator().manual_seed(7)
    support = torch.randn(4, 3, generator=g, dtype=torch.float64) * 3
    energy = OTEnergy(support, torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64))
    cands = torch.randn(24, 3, generator=g, dtype=torch.float64) * 3
    chosen = []
    for _ in range(6):  # the greedy rule spelled out: the cheapest extended set at each pick
        rest = [j for j in range(24) if j not in chosen]
        chosen.append(min(rest, key=lambda j: float(energy(cands[chosen + [j]]))))
    assert energy.select(cands, 6).tolist() == chosen
    assert energy(cands[chosen]) < energy(cands[:6])
    with pytest.raises(ValueError, match="n <= 24"):
        energy.select(cands, 25)
