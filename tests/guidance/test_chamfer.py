import pytest
import torch

from factory.guidance.chamfer import (
    ChamferEnergy,
    chamfer_distance,
    pairwise_sq_dists,
    select_reference_indices,
    select_references,
)
from factory.sampler import normalize_grad



def brute_chamfer(X, Y, cw=1.0, fw=1.0):
    cov = 0.0
    for x in X:
        cov = cov + min(((x - y) ** 2).sum() for y in Y)
    fid = 0.0
    for y in Y:
        fid = fid + min(((x - y) ** 2).sum() for x in X)
    return cw * cov / len(X) + fw * fid / len(Y)


def test_value_and_gradient_match_bruteforce():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 7, generator=g, dtype=torch.float64) + 3.0
    Y1 = (torch.randn(9, 7, generator=g, dtype=torch.float64) + 3.0).requires_grad_(True)
    Y2 = Y1.detach().clone().requires_grad_(True)
    v = chamfer_distance(X, Y1, 0.7, 1.3)
    b = brute_chamfer(X, Y2, 0.7, 1.3)
    assert torch.allclose(v, b, rtol=1e-10, atol=1e-10)
    (g1,) = torch.autograd.grad(v, Y1)
    (g2,) = torch.autograd.grad(b, Y2)
    assert torch.allclose(g1, g2, rtol=1e-8, atol=1e-10)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    Y = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: chamfer_distance(a, b), (X, Y), eps=1e-6, atol=1e-5)


def test_energy_without_frozen_is_chamfer_and_float32_ok():
    g = torch.Generator().manual_seed(2)
    refs = torch.randn(6, 5, generator=g)
    feats = torch.randn(4, 5, generator=g, requires_grad=True)
    e = ChamferEnergy(refs)
    assert e(feats).dtype == torch.float32
    assert torch.allclose(e(feats), chamfer_distance(refs, feats))
    (gr,) = torch.autograd.grad(e(feats), feats)
    assert torch.isfinite(gr).all()


def test_energy_frozen_coverage_over_union_fidelity_over_batch():
    g = torch.Generator().manual_seed(3)
    refs = torch.randn(6, 3, generator=g, dtype=torch.float64)
    feats = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    frozen = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    e = ChamferEnergy(refs, coverage_weight=2.0, fidelity_weight=0.5)
    allY = torch.cat([frozen, feats])
    cov = brute_chamfer(refs, allY, 1.0, 0.0)
    fid = brute_chamfer(refs, feats, 0.0, 1.0)
    v = e(feats, frozen)
    assert torch.allclose(v, 2.0 * cov + 0.5 * fid, rtol=1e-10)
    v.backward()
    assert frozen.grad is None  # frozen carries no gradient
    assert feats.grad is not None
    # empty frozen == no frozen
    assert torch.allclose(e(feats, frozen[:0]), e(feats))


def test_frozen_covering_refs_removes_coverage_pull():
    refs = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    feats = torch.tensor([[0.1, 0.0]], requires_grad=True)
    frozen = torch.tensor([[10.0, 0.0]])
    e = ChamferEnergy(refs, fidelity_weight=0.0)
    (gfree,) = torch.autograd.grad(e(feats), feats)
    (gfz,) = torch.autograd.grad(e(feats, frozen), feats)
    # alone, the single sample is also pulled by the far reference; with the far one covered
    # by a frozen sample, only the near reference pulls (towards 0).
    assert gfz[0, 0] > 0 and torch.allclose(gfz, torch.tensor([[0.1, 0.0]]), atol=1e-5)
    assert not torch.allclose(gfree, gfz)


def test_coverage_moves_only_the_nearest_sample_by_how_far_it_is():
    """The set-level structure guidance relies on: each reference pulls only the sample nearest to it, with a
    gradient proportional to their distance; a sample nearest to no reference gets no coverage pull."""
    refs = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    feats = torch.tensor([[1.0, 0.0], [7.0, 0.0], [30.0, 30.0]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(ChamferEnergy(refs, fidelity_weight=0.0)(feats), feats)
    assert torch.allclose(g, torch.tensor([[1.0, 0.0], [-3.0, 0.0], [0.0, 0.0]], dtype=torch.float64))


def test_set_normalisation_keeps_chamfer_structure_per_image_does_not():
    """With one scale for the batch (the sampler's ``normalize: set``, what the Chamfer recipes use) each
    sample moves in proportion to its Chamfer gradient: the far one far, the one already on a reference
    (nearly) not at all; per-image normalisation (``l2``) gives every sample the same step size."""
    refs = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    feats = torch.tensor([[1.0, 0.0], [16.0, 0.0], [0.0, 0.01]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(ChamferEnergy(refs)(feats), feats)
    raw = g.norm(dim=1)
    assert raw[1] > 5 * raw[0] > 100 * raw[2]  # B pulls the far sample; the one on A is nearly at rest
    step = normalize_grad(g, "set", feats).norm(dim=1)
    assert torch.allclose(step / raw, (step / raw)[0].expand(3))  # one scale shared by the set
    assert torch.allclose(step.pow(2).sum() / g.numel(), torch.tensor(1.0, dtype=torch.float64))
    per_image = normalize_grad(g, "l2", feats).norm(dim=1)
    assert torch.allclose(per_image, per_image[0].expand(3))


def test_balance_scales_fidelity_by_refs_over_batch_when_fewer_refs():
    g = torch.Generator().manual_seed(4)
    refs = torch.randn(2, 3, generator=g, dtype=torch.float64)
    feats = torch.randn(10, 3, generator=g, dtype=torch.float64)
    t = ChamferEnergy(refs).terms(feats)
    assert torch.allclose(ChamferEnergy(refs, balance=True)(feats), t["coverage"] + 0.2 * t["fidelity"])
    assert torch.allclose(ChamferEnergy(refs)(feats), t["coverage"] + t["fidelity"])
    many = torch.randn(32, 3, generator=g, dtype=torch.float64)  # k >= batch: the paper's form unchanged
    assert torch.allclose(ChamferEnergy(many, balance=True)(feats), ChamferEnergy(many)(feats))
    with pytest.raises(ValueError, match="balance"):
        ChamferEnergy(refs, balance="yes")


def test_masses_weigh_the_coverage_term_and_are_checked():
    g = torch.Generator().manual_seed(5)
    refs = torch.randn(4, 3, generator=g, dtype=torch.float64)
    feats = torch.randn(6, 3, generator=g, dtype=torch.float64)
    nearest = pairwise_sq_dists(refs, feats).min(dim=1).values
    m = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)  # normalised to sum to 1
    t = ChamferEnergy(refs, masses=m).terms(feats)
    assert torch.allclose(t["coverage"], (nearest * m / 8).sum())
    assert torch.allclose(t["fidelity"], ChamferEnergy(refs).terms(feats)["fidelity"])  # fidelity is unweighted
    uniform = ChamferEnergy(refs, masses=torch.ones(4, dtype=torch.float64))
    assert torch.allclose(uniform(feats), ChamferEnergy(refs)(feats))
    # a heavy reference pulls its nearest sample harder than a light one at the same distance
    two = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    ys = torch.tensor([[1.0, 0.0], [11.0, 0.0]], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(ChamferEnergy(two, fidelity_weight=0.0, masses=[0.9, 0.1])(ys), ys)
    assert grad[0].norm() > 8 * grad[1].norm()
    for bad in ([1.0, 1.0], [1.0, -1.0, 1.0, 1.0], [0.0] * 4, [float("nan"), 1.0, 1.0, 1.0]):
        with pytest.raises(ValueError, match="masses"):
            ChamferEnergy(refs, masses=bad)


def _cost_of_a_partial_set(energy, ys, n):
    """The energy of a set that will hold n samples: fidelity's mean has the final size n as denominator."""
    t = energy.terms(ys)
    fw = energy.fidelity_weight * (min(1.0, energy.num_refs / n) if energy.balance else 1.0)
    return float(energy.coverage_weight * t["coverage"] + fw * t["fidelity"] * len(ys) / n)


def test_select_is_the_greedy_minimum_of_the_energy_itself():
    g = torch.Generator().manual_seed(6)
    refs = torch.randn(8, 3, generator=g, dtype=torch.float64)
    cands = torch.randn(30, 3, generator=g, dtype=torch.float64)
    for energy in (ChamferEnergy(refs, balance=True, masses=torch.rand(8, generator=g, dtype=torch.float64)),
                   ChamferEnergy(refs[:2], balance=True), ChamferEnergy(refs, fidelity_weight=0.5)):
        chosen = []
        for _ in range(5):  # greedy by evaluating the whole energy on every extended set
            rest = [j for j in range(30) if j not in chosen]
            chosen.append(min(rest, key=lambda j: _cost_of_a_partial_set(energy, cands[chosen + [j]], 5)))
        assert energy.select(cands, 5).tolist() == chosen
        assert _cost_of_a_partial_set(energy, cands[chosen], 5) == pytest.approx(float(energy(cands[chosen])))
    picked = ChamferEnergy(refs, balance=True).select(cands, 8)
    assert len(set(picked.tolist())) == 8
    assert ChamferEnergy(refs, balance=True)(cands[picked]) < ChamferEnergy(refs, balance=True)(cands[:8])
    with pytest.raises(ValueError, match="n <= 30"):
        ChamferEnergy(refs).select(cands, 31)


def test_select_references_deterministic_subset():
    feats = torch.arange(100 * 3, dtype=torch.float32).reshape(100, 3)
    a = select_references(feats, 10, seed=7)
    b = select_references(feats, 10, seed=7)
    c = select_references(feats, 10, seed=8)
    assert a.shape == (10, 3) and torch.equal(a, b) and not torch.equal(a, c)
    idx = select_reference_indices(100, 10, seed=7)
    assert len(set(idx.tolist())) == 10 and torch.equal(a, feats[idx])
    assert torch.equal(select_references(feats.numpy(), 10, seed=7), a)
    assert select_references(feats[:4], 10, seed=0).shape == (4, 3)
    with pytest.raises(ValueError):
        select_references(feats, 0)
