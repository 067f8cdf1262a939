import math

import pytest
import torch

from factory.guidance.softlabel import (
    BETA_N,
    BETA_S,
    EXPLORE_FROM,
    REFINE_UNTIL,
    embedding_noise_std,
    pick_other_class,
    sigma_t,
    soft_label_embedding,
    soft_label_mean,
    soft_label_parts,
    stage,
)


def _emb(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_paper_defaults_and_stages():
    assert (EXPLORE_FROM, REFINE_UNTIL, BETA_S, BETA_N) == (0.9, 0.5, 0.01, 0.06)
    assert stage(1.0) == "explore" and stage(0.9) == "explore"
    assert stage(0.89) == "soft" and stage(0.51) == "soft"
    assert stage(0.5) == "refine" and stage(0.0) == "refine"
    assert sigma_t(0.95) == 0.0 and sigma_t(0.3) == 1.0
    assert math.isclose(sigma_t(0.7), 0.5)
    assert math.isclose(sigma_t(0.7, schedule="cosine"), 0.5)
    assert sigma_t(0.8) < sigma_t(0.6)  # label gets cleaner as t decreases


def test_refinement_returns_exact_class_embedding():
    f, fo = _emb((8,), 0), _emb((8,), 1)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    for t in (0.5, 0.3, 0.0):
        out = soft_label_embedding(t, f, fo, g)
        assert out is f
    assert torch.equal(g.get_state(), state)  # no randomness consumed
    assert soft_label_embedding(0.2, f, fo, None) is f


def test_mixing_stage_expectation_matches_formula():
    f, fo = _emb((2, 5, 4), 2), _emb((2, 5, 4), 3)  # e.g. prompt-embedding sequences
    t = 0.75
    r = math.sqrt(sigma_t(t))
    expected = r * f + (1 - r) * BETA_S * fo
    assert torch.allclose(soft_label_mean(t, f, fo), expected)
    g = torch.Generator().manual_seed(0)
    n = 4000
    draws = torch.stack([soft_label_embedding(t, f, fo, g) for _ in range(n)])
    assert draws.shape == (n, 2, 5, 4)
    std = (1 - r) * BETA_N * (f - fo).abs() / math.sqrt(2)
    # sample mean within 5 standard errors of the formula, elementwise
    assert ((draws.mean(0) - expected).abs() <= 5 * std / math.sqrt(n) + 1e-6).all()
    # anisotropic noise with the documented per-element std
    assert torch.allclose(draws.std(0), std, rtol=0.1, atol=1e-6)


def test_exploration_stage_is_fully_diffused_label():
    f, fo = _emb((16,), 4), _emb((16,), 5)
    out = soft_label_embedding(0.95, f, fo, torch.Generator().manual_seed(1), noise_std=0.0)
    assert torch.allclose(out, BETA_S * fo)


def test_unconditional_baseline_is_what_the_label_decays_to():
    f, fo, null = _emb((3, 16), 4), _emb((3, 16), 5), _emb((16,), 6)
    explore = soft_label_embedding(0.95, f, fo, torch.Generator().manual_seed(1), noise_std=0.0, baseline=null)
    assert torch.allclose(explore, null + BETA_S * fo)
    mid = 0.5 * (EXPLORE_FROM + REFINE_UNTIL)
    r = math.sqrt(sigma_t(mid))
    soft = soft_label_embedding(mid, f, fo, torch.Generator().manual_seed(1), noise_std=0.0, baseline=null)
    assert torch.allclose(soft, r * f + (1 - r) * (null + BETA_S * fo))
    assert soft_label_embedding(0.1, f, fo, None, baseline=null) is f


def test_parts_are_the_weight_and_the_decayed_label_of_the_embedding():
    f, fo, null = _emb((3, 16), 4), _emb((3, 16), 5), _emb((16,), 6)
    for t in (0.95, 0.8, 0.6):
        r, decayed = soft_label_parts(t, f, fo, torch.Generator().manual_seed(2), baseline=null)
        assert r == math.sqrt(sigma_t(t))
        assert torch.equal(soft_label_embedding(t, f, fo, torch.Generator().manual_seed(2), baseline=null),
                           r * f + (1 - r) * decayed)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    assert soft_label_parts(0.2, f, fo, g) == (1.0, None) and torch.equal(g.get_state(), state)


def test_deterministic_under_seed_and_custom_noise_std():
    f, fo = _emb((3, 8), 6), _emb((3, 8), 7)
    table = _emb((10, 8), 8)
    std = embedding_noise_std(table)
    assert std.shape == (8,)
    a = soft_label_embedding(0.8, f, fo, torch.Generator().manual_seed(5), noise_std=std)
    b = soft_label_embedding(0.8, f, fo, torch.Generator().manual_seed(5), noise_std=std)
    c = soft_label_embedding(0.8, f, fo, torch.Generator().manual_seed(6), noise_std=std)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == f.shape and a.dtype == f.dtype
    # half precision embeddings keep their dtype
    h = soft_label_embedding(0.8, f.half(), fo.half(), torch.Generator().manual_seed(5))
    assert h.dtype == torch.float16 and torch.isfinite(h).all()
    # broadcasting a single other-class vector over a batch
    d = soft_label_embedding(0.8, f, fo[0], torch.Generator().manual_seed(5))
    assert d.shape == f.shape
    with pytest.raises(ValueError):
        soft_label_embedding(0.8, f, fo, None)


def test_pick_other_class():
    g = torch.Generator().manual_seed(0)
    draws = [pick_other_class(3, 5, g) for _ in range(500)]
    assert 3 not in draws and set(draws) == {0, 1, 2, 4}
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert [pick_other_class(0, 10, g1) for _ in range(5)] == [pick_other_class(0, 10, g2) for _ in range(5)]
    labels = torch.tensor([0, 1, 2, 3] * 50)
    other = pick_other_class(labels, 4, torch.Generator().manual_seed(1))
    assert other.shape == labels.shape and (other != labels).all() and other.max() < 4
    assert pick_other_class(0, 1, g) == 0
    with pytest.raises(ValueError):
        pick_other_class(5, 5, g)
