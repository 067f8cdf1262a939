import pytest
import torch
from diffusers import DDIMScheduler

from factory.backbones import TinyBackbone
from factory.embedded import build_unet, scheduler_config, tiny_unet_config
from factory.sampler import Guidance, MixedCondition, normalize_grad, predict_cfg, sample


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    unet = build_unet(tiny_unet_config(8, 1, 10, channels=(16, 32), attention=False))
    return TinyBackbone(unet, DDIMScheduler(**scheduler_config()), (8, 8))


def _plain(backbone, labels, seed, steps, cfg_scale):
    """Reference: the textbook diffusers CFG loop with integer class labels."""
    unet, sched = backbone.unet, backbone.scheduler
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(backbone.noise_shape(len(labels)), generator=g) * sched.init_noise_sigma
    null = torch.full_like(labels, backbone.null_id)
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
            c, u = out.chunk(2)
            x = sched.step(u + cfg_scale * (c - u), t, x, eta=0.0, generator=g).prev_sample
    return x.clamp(-1, 1)


def test_guidance_off_is_plain_sampling_bit_for_bit(backbone):
    labels = torch.tensor([0, 3, 3, 9])
    ref = _plain(backbone, labels, seed=7, steps=6, cfg_scale=2.5)
    got = sample(backbone, backbone.scheduler, labels, torch.Generator().manual_seed(7), 6, cfg_scale=2.5).images
    assert torch.equal(got, ref)
    # an energy that is never active leaves the result untouched as well
    idle = Guidance(lambda f, frozen: f.sum(), weight=5.0, window=(2.0, 2.0))
    again = sample(backbone, backbone.scheduler, labels, torch.Generator().manual_seed(7), 6, cfg_scale=2.5,
                   guidance=[idle], features=lambda x: x.flatten(1)).images
    assert torch.equal(again, ref)


def test_a_mixed_condition_is_the_weighted_mean_of_its_conditions_outputs_under_cfg(backbone):
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    a, b, null = backbone.condition(torch.tensor([1, 4, 4])), backbone.condition(torch.tensor([7, 0, 2])), \
        backbone.null_condition(3)
    with torch.no_grad():
        pa, pb, u = (backbone.predict(x, t, c) for c in (a, b, null))
        for scale, nul in ((3.0, null), (1.0, None)):
            got = predict_cfg(backbone, x, t, MixedCondition((a, b), (0.3, 0.7)), nul, scale)
            mixed = 0.3 * pa + 0.7 * pb
            want = mixed if nul is None else u + scale * (mixed - u)
            assert torch.allclose(got, want, atol=1e-5)
        only_a = predict_cfg(backbone, x, t, MixedCondition((a, b), (1.0, 0.0)), null, 3.0)
        assert torch.allclose(only_a, predict_cfg(backbone, x, t, a, null, 3.0), atol=1e-5)
        assert not torch.allclose(only_a, predict_cfg(backbone, x, t, b, null, 3.0), atol=1e-3)


def test_cfg_free_skips_the_unconditional_pass(backbone):
    calls = []
    orig = backbone.predict

    def counting(x, t, cond):
        calls.append(x.shape[0])
        return orig(x, t, cond)

    backbone.predict = counting
    try:
        sample(backbone, backbone.scheduler, torch.tensor([1, 2]), torch.Generator().manual_seed(0), 4, cfg_scale=1.0)
    finally:
        del backbone.predict
    assert calls == [2, 2, 2, 2]


def test_energy_gradient_steers_the_batch(backbone):
    target = torch.full((1, 64), 0.8)

    def energy(feats, frozen):
        return ((feats - target) ** 2).sum(dim=1).mean()

    def mean_energy(images):
        return float(energy(images.flatten(1), None))

    labels = torch.tensor([1, 1, 1, 1])
    base = sample(backbone, backbone.scheduler, labels, torch.Generator().manual_seed(3), 8).images
    for through in ("model", "x0"):
        g = Guidance(energy, weight=1.0, every=1, normalize="l2")
        res = sample(backbone, backbone.scheduler, labels, torch.Generator().manual_seed(3), 8, guidance=[g],
                     features=lambda x: x.flatten(1), grad_through=through)
        assert mean_energy(res.images) < 0.5 * mean_energy(base)
        assert len(res.energy_trace) == 8


def test_schedule_every_and_window():
    g = Guidance(lambda f, fr: f.sum(), every=5, window=(0.0, 1.0))
    assert [i for i in range(20) if g.active(i, 20)] == [0, 5, 10, 15]
    w = Guidance(lambda f, fr: f.sum(), every=1, window=(0.6, 0.9))
    assert [i for i in range(50) if w.active(i, 50)] == list(range(30, 46))


def test_img2img_strength_starts_near_the_image(backbone):
    init = torch.zeros(2, 1, 8, 8)
    res = sample(backbone, backbone.scheduler, torch.tensor([0, 1]), torch.Generator().manual_seed(0), 10,
                 init_images=init, strength=0.1)
    assert res.images.abs().mean() < 0.2


def test_normalize_grad():
    g = torch.randn(3, 1, 4, 4)
    x = torch.randn(3, 1, 4, 4)
    assert torch.allclose(normalize_grad(g, "l2", x).flatten(1).pow(2).mean(1), torch.ones(3))
    assert torch.allclose(normalize_grad(g, "linf", x).flatten(1).abs().amax(1), torch.ones(3))
    assert torch.allclose(normalize_grad(g, "latent", x).flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    assert torch.equal(normalize_grad(g, "none", x), g)


@pytest.mark.parametrize("kind", ["DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler"])
def test_schedulers_without_eta_sample(backbone, kind):
    """Schedulers whose step takes no eta (SD 1.5's native PNDM, DDPM) used to crash with a TypeError."""
    import diffusers

    cfg = {k: v for k, v in scheduler_config().items() if k in ("num_train_timesteps", "beta_schedule",
                                                                  "beta_start", "beta_end", "prediction_type")}
    sched = getattr(diffusers, kind)(**cfg)
    labels = torch.tensor([1, 2])
    out = sample(backbone, sched, labels, torch.Generator().manual_seed(0), 4, cfg_scale=2.0).images
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="has no eta"):
        sample(backbone, sched, labels, torch.Generator().manual_seed(0), 4, eta=0.5)


def test_images_and_energy_trace_come_back_from_the_loop(backbone):
    """The loop stays on the backbone's device; the trace holds plain floats read back once at the end."""
    labels = torch.tensor([4, 4, 4])
    g = Guidance(lambda f, frozen: f.pow(2).mean(), weight=0.1, name="sq")
    res = sample(backbone, backbone.scheduler, labels, torch.Generator().manual_seed(3), 5, guidance=[g],
                 features=lambda x: x.flatten(1))
    assert res.images.device == backbone.device
    assert len(res.energy_trace) == 5 and all(type(r["value"]) is float for r in res.energy_trace)


def test_normalize_grad_set_keeps_the_batch_relative_steps():
    """``set``: one scale for the whole batch (unit RMS over all of it), so a sample a set energy barely moves
    stays nearly still; per image (l2) would scale it up to a full step like the others."""
    g = torch.randn(3, 1, 4, 4)
    g[1] *= 1e-3  # a sample the energy leaves (almost) alone
    x = torch.randn(3, 1, 4, 4)
    s = normalize_grad(g, "set", x)
    assert torch.allclose(s.pow(2).mean(), torch.tensor(1.0))
    ratio = s / g  # a single scale, shared by every sample
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))
    assert s[1].pow(2).mean() < 1e-4 * s[0].pow(2).mean()
    assert torch.allclose(normalize_grad(g, "l2", x)[1].pow(2).mean(), torch.tensor(1.0))
    assert torch.equal(normalize_grad(torch.zeros(2, 3), "set", x), torch.zeros(2, 3))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_guided_output_moves_x0_by_delta_in_every_prediction_type(kind):
    """No step returns the model output itself; a step Δ moves x̂₀ by −Δ at the same x_t (v-prediction's
    inverse once returned a·ε − s·x_t instead of a·ε − s·x̂₀)."""
    from factory.sampler import guided_output, output_of, predict_x0, x0_and_eps

    sched = DDIMScheduler(prediction_type=kind)
    sched.set_timesteps(10)
    t, gen = sched.timesteps[3], torch.Generator().manual_seed(0)
    x, out, delta = (torch.randn(2, 1, 4, 4, generator=gen) for _ in range(3))
    torch.testing.assert_close(guided_output(sched, out, x, t, 3, torch.zeros_like(x)), out, rtol=1e-4, atol=1e-4)
    x0, _ = predict_x0(sched, out, x, t, 3)
    moved, _ = predict_x0(sched, guided_output(sched, out, x, t, 3, delta), x, t, 3)
    torch.testing.assert_close(moved, x0 - delta, rtol=1e-4, atol=1e-4)
    a, s = torch.tensor(0.6), torch.tensor(0.8)  # per-sample a, s broadcast as in training
    x0, eps = torch.randn(2, 1, 4, 4, generator=gen), torch.randn(2, 1, 4, 4, generator=gen)
    back = x0_and_eps(kind, output_of(kind, x0, eps, a, s), a * x0 + s * eps, a, s)
    torch.testing.assert_close(back, (x0, eps), rtol=1e-5, atol=1e-5)


def test_self_recurrence_repeats_guided_steps_and_pushes_further():
    """recurrence r: each guided step r times, re-noised between, so the energy gets r pushes per noise
    level and ends lower (the packaged digits UNet: an untrained one denoises the fresh noise badly);
    unguided steps are not repeated."""
    from factory.backbones import load_backbone

    digits = load_backbone("tiny", "digits", (8, 8))
    target = torch.full((1, 64), 0.8)

    def energy(feats, frozen):
        return ((feats - target) ** 2).sum(dim=1).mean()

    labels = torch.tensor([1, 1, 1, 1])
    ends, guided = {}, {}
    for r in (1, 3):
        g = Guidance(energy, weight=0.2, every=1, window=(0.5, 1.0), normalize="l2")
        res = sample(digits, digits.scheduler, labels, torch.Generator().manual_seed(3), 10, guidance=[g],
                     features=lambda x: x.flatten(1), grad_through="x0", recurrence=r)
        guided[r] = len(res.energy_trace)
        ends[r] = float(energy(res.images.flatten(1), None))
    assert 0 < guided[1] < 10 and guided[3] == 3 * guided[1]  # the window's steps, each r times
    assert ends[3] < 0.5 * ends[1]  # measured: 58.8 against 12.7
    plain = sample(digits, digits.scheduler, labels, torch.Generator().manual_seed(3), 10).images
    assert torch.equal(plain, sample(digits, digits.scheduler, labels, torch.Generator().manual_seed(3), 10,
                                     recurrence=3).images)  # nothing guided: nothing repeated


def test_self_recurrence_needs_ddim_and_a_positive_count(backbone):
    from diffusers import DDPMScheduler

    labels = torch.tensor([1])
    with pytest.raises(ValueError, match="recurrence must be >= 1"):
        sample(backbone, backbone.scheduler, labels, torch.Generator().manual_seed(0), 2, recurrence=0)
    with pytest.raises(ValueError, match="DDPMScheduler has none"):
        sample(backbone, DDPMScheduler(**{k: v for k, v in scheduler_config().items() if k != "clip_sample"}),
               labels, torch.Generator().manual_seed(0), 2, recurrence=2)
