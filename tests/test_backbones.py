"""Backbone adapters and feature spaces on tiny random-weight models (no hub), saved and reloaded by folder."""

import json
import warnings

import pytest
import torch

from factory.backbones import DiTBackbone, load_backbone, load_features, to_mode
from factory.random_models import build_components, build_features_model, save_pipeline
from factory.guidance import ChamferEnergy, LowDensityEnergy, OTEnergy
from factory.guidance.softlabel import soft_label_embedding
from factory.sampler import Guidance, predict_x0, sample

NAMES = ["cat", "golden_retriever", "ship"]
LATENT = ["sd15", "sd35m", "dit-xl-2"]



@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name in LATENT:
        comps = build_components(name, "tiny", seed=1)
        taesd = comps.pop("tiny_vae")
        save_pipeline(comps, root / name)
        taesd.save_pretrained(str(root / f"{name}-taesd"))
        out[name] = root / name
        out[f"{name}-taesd"] = root / f"{name}-taesd"
    (root / "dit-xl-2" / "model_index.json").write_text(json.dumps(
        {"_class_name": "DiTPipeline", "id2label": {"207": "golden retriever", "281": "tabby, tabby cat",
                                                    "510": "container ship, containership, container vessel"}}))
    # an SD3 folder without T5, as SD3 pipelines allow
    comps = build_components("sd35m", "tiny", seed=1)
    for k in ("text_encoder_3", "tokenizer_3", "tiny_vae"):
        comps.pop(k)
    save_pipeline(comps, root / "sd35m-no-t5")
    out["sd35m-no-t5"] = root / "sd35m-no-t5"
    # the embedded tiny backbone
    tiny = build_components("tiny", "tiny", seed=1)
    save_pipeline(tiny, root / "tiny")
    out["tiny"] = root / "tiny"
    # feature spaces
    for name in ("dinov2", "clip", "cnn"):
        model, size = build_features_model(name, "tiny", seed=2)
        model.save_pretrained(str(root / name)) if name != "cnn" else model.save(root / name)
        out[name] = root / name
    (root / "dinov2" / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 32, "width": 32}, "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225]}))
    return out


def _load(folders, key, real_size=(8, 8), **options):
    name = "sd35m" if key == "sd35m-no-t5" else key
    if name == "tiny":
        return load_backbone("tiny", str(folders["tiny"]), real_size)
    if name in ("sd15", "sd35m"):
        options.setdefault("class_names", NAMES)
        options.setdefault("mode", "L")
        if name == "sd35m":
            options.setdefault("max_sequence_length", 16)
    else:
        options.setdefault("class_ids", [207, 281, 510])
        options.setdefault("mode", "L")
    return load_backbone(name, str(folders[key]), real_size, **options)


@pytest.fixture(scope="module")
def backbones(folders):
    return {name: _load(folders, name) for name in ["tiny", *LATENT]}


FEATURES_FOR = {"tiny": "cnn", "sd15": "dinov2", "sd35m": "clip", "dit-xl-2": "dinov2"}


@pytest.fixture(scope="module")
def feature_spaces(folders):
    return {name: load_features(name, str(folders[name])) for name in ("dinov2", "clip", "cnn")}


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", LATENT)
def test_sample_by_folder_with_and_without_cfg(backbones, name):
    b = backbones[name]
    labels = torch.tensor([0, 2])
    calls = []
    orig = b.predict

    def counting(x, t, cond):
        calls.append(x.shape[0])
        return orig(x, t, cond)

    b.predict = counting
    try:
        for cfg in (1.0, 3.0):
            res = sample(b, b.scheduler, labels, torch.Generator().manual_seed(0), 2, cfg_scale=cfg)
            assert res.images.shape == (2, 1, 8, 8)
            assert res.images.dtype == torch.float32 and torch.isfinite(res.images).all()
            assert res.images.abs().max() <= 1
    finally:
        del b.predict
    assert calls == [2, 2, 4, 4]  # CFG off: one pass; on: conditional and null in one batch


def test_latent_shapes_and_conditions(backbones):
    sd15, sd3, dit = backbones["sd15"], backbones["sd35m"], backbones["dit-xl-2"]
    assert sd15.noise_shape(3) == (3, 4, 16, 16) and sd15.resolution == (32, 32)
    assert sd15.condition(torch.tensor([1, 1])).shape == (2, 77, 32)
    assert sd15.null_condition(2).shape == (2, 77, 32)
    assert sd15.prompt(1) == "a photo of a golden retriever"
    # SD3: 77 CLIP rows + 16 T5 rows + 1 row holding the pooled projection (32 < joint dim 64)
    cond = sd3.condition(torch.tensor([0, 2]))
    assert cond.shape == (2, 77 + 16 + 1, 64)
    prompt, pooled = sd3.unpack(cond)
    assert prompt.shape == (2, 93, 64) and pooled.shape == (2, 32)
    assert torch.equal(sd3.pack(prompt, pooled), cond)
    assert (cond[:, -1, 32:] == 0).all()
    assert dit.condition(torch.tensor([0, 1, 2])).shape == (3, 16)
    assert dit.null_id == 1000 and dit.num_classes == 3
    # cached: the text encoder runs once per class
    calls = []
    hook = sd15.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        sd15.condition(torch.tensor([1, 0, 1]))
        sd15.condition(torch.tensor([0, 1]))
    finally:
        hook.remove()
    assert len(calls) <= 1  # class 1 was cached above; class 0 is encoded once


def test_sd15_matches_the_diffusers_pipeline(backbones):
    from diffusers import StableDiffusionPipeline

    b = backbones["sd15"]
    pipe = StableDiffusionPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer, unet=b.unet,
                                   scheduler=b.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pos, neg = pipe.encode_prompt(["a photo of a ship"], "cpu", 1, True)
    assert torch.allclose(b.condition(torch.tensor([2])), pos, atol=1e-6)
    assert torch.allclose(b.null_condition(1), neg, atol=1e-6)
    x, t = torch.randn(1, 4, 16, 16), b.scheduler.timesteps[0]
    with torch.no_grad():
        ref = b.unet(x, t, encoder_hidden_states=pos).sample
    assert torch.allclose(b.predict(x, t, b.condition(torch.tensor([2]))), ref, atol=1e-5)


def test_sd3_matches_the_diffusers_pipeline(backbones):
    from diffusers import StableDiffusion3Pipeline

    b = backbones["sd35m"]
    (e1, e2, e3), (t1, t2, t3) = b.text_encoders, b.tokenizers
    pipe = StableDiffusion3Pipeline(transformer=b.transformer, scheduler=b.scheduler, vae=b.vae, text_encoder=e1,
                                    tokenizer=t1, text_encoder_2=e2, tokenizer_2=t2, text_encoder_3=e3, tokenizer_3=t3)
    pos, neg, pooled, neg_pooled = pipe.encode_prompt("a photo of a cat", None, None, device="cpu",
                                                      do_classifier_free_guidance=True, max_sequence_length=16)
    got, got_pooled = b.unpack(b.condition(torch.tensor([0])))
    assert torch.allclose(got, pos, atol=1e-6) and torch.allclose(got_pooled, pooled, atol=1e-6)
    null, null_pooled = b.unpack(b.null_condition(1))
    assert torch.allclose(null, neg, atol=1e-6) and torch.allclose(null_pooled, neg_pooled, atol=1e-6)
    x = torch.randn(1, 4, 16, 16)
    b.scheduler.set_timesteps(3)
    t = b.scheduler.timesteps[1]
    with torch.no_grad():
        ref = b.transformer(hidden_states=x, encoder_hidden_states=pos, pooled_projections=pooled,
                            timestep=t.expand(1)).sample
    assert torch.allclose(b.predict(x, t, b.condition(torch.tensor([0]))), ref, atol=1e-5)


def test_sd3_without_t5(folders, backbones):
    b = _load(folders, "sd35m-no-t5")
    assert b.text_encoders[2] is None and b.tokenizers[2] is None
    cond = b.condition(torch.tensor([0]))
    assert cond.shape == backbones["sd35m"].condition(torch.tensor([0])).shape
    assert (cond[:, 77:-1] == 0).all()  # zeros where T5 would be, as in the pipeline
    assert not _load(folders, "sd35m", use_t5=False).text_encoders[2]
    res = sample(b, b.scheduler, torch.tensor([0, 1]), torch.Generator().manual_seed(0), 2, cfg_scale=1.0)
    assert torch.isfinite(res.images).all()


def test_dit_label_embeddings_pass_through(backbones):
    b = backbones["dit-xl-2"]
    x, t = torch.randn(2, 4, 16, 16), b.scheduler.timesteps[0]
    ids = torch.tensor([207, 1000])
    with torch.no_grad():
        ref = b.transformer(x, timestep=t.expand(2), class_labels=ids).sample[:, :4]  # integer ids, learned sigma off
    cond = torch.cat([b.condition(torch.tensor([0])), b.null_condition(1)])
    assert torch.allclose(b.predict(x, t, cond), ref, atol=1e-5)


def test_dit_class_names_map_to_imagenet_ids(folders):
    b = load_backbone("dit-xl-2", str(folders["dit-xl-2"]), (8, 8), class_names=["tabby", "Golden_Retriever"])
    assert b.class_ids.tolist() == [281, 207]
    with pytest.raises(ValueError, match="not an ImageNet label"):
        load_backbone("dit-xl-2", str(folders["dit-xl-2"]), (8, 8), class_names=["zebra"])


def test_dit_untied_tables_warn():
    comps = build_components("dit-xl-2", "tiny", seed=3)
    with torch.no_grad():
        comps["transformer"].transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
    with pytest.warns(UserWarning, match="block 0"):
        DiTBackbone(comps["transformer"], comps["vae"], comps["scheduler"], (8, 8))


@pytest.mark.parametrize("name", ["sd35m", "dit-xl-2"])
def test_soft_labels_interpolate_conditions(backbones, name):
    b = backbones[name]
    labels = torch.tensor([0, 1])
    f, other = b.condition(labels), b.condition(torch.tensor([1, 2]))
    g = torch.Generator().manual_seed(0)

    def condition(i, n):
        return soft_label_embedding(1 - i / n, f, other, g)

    res = sample(b, b.scheduler, labels, torch.Generator().manual_seed(0), 3, cfg_scale=2.0, condition=condition)
    assert torch.isfinite(res.images).all()


# ----------------------------------------------------------------------------- decode / encode / options


def test_decode_to_real_size_and_mode(folders, backbones):
    b = backbones["sd15"]
    x = torch.randn(2, *b.noise_shape(1)[1:])
    assert b.decode(x).shape == (2, 1, 8, 8)
    rgb = _load(folders, "sd15", real_size=(3, 20, 24), mode=None)
    assert rgb.mode == "RGB" and rgb.decode(x).shape == (2, 3, 20, 24)
    grey = _load(folders, "dit-xl-2", real_size=(1, 28, 28), mode=None)
    assert grey.decode(torch.randn(1, 4, 16, 16)).shape == (1, 1, 28, 28)
    pix = torch.rand(2, 3, 4, 4) * 2 - 1
    assert torch.allclose(to_mode(pix, "L"), (pix * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True))
    # encode takes the real set's images (grey, any size) back to model space
    z = b.encode(torch.rand(2, 1, 8, 8) * 2 - 1)
    assert z.shape == (2, 4, 16, 16) and torch.isfinite(z).all()
    res = sample(b, b.scheduler, torch.tensor([0, 1]), torch.Generator().manual_seed(0), 4,
                 init_images=torch.zeros(2, 1, 8, 8), strength=0.5)
    assert torch.isfinite(res.images).all()


def test_resolution_option(folders):
    b = _load(folders, "sd15", resolution=48)
    assert b.noise_shape(1) == (1, 4, 24, 24)
    with pytest.raises(ValueError, match="divisible"):
        _load(folders, "sd35m", resolution=30)


def test_tiny_guidance_decoder_is_used_on_the_guidance_path_only(folders, backbones):
    b = _load(folders, "sd15", guidance_decoder="tiny", tiny_vae=str(folders["sd15-taesd"]))
    ref = backbones["sd15"]
    x = torch.randn(2, 4, 16, 16)
    assert torch.allclose(b.decode(x, guidance=False), ref.decode(x), atol=1e-6)
    assert not torch.allclose(b.decode(x, guidance=True), ref.decode(x), atol=1e-3)
    with torch.enable_grad():
        assert torch.equal(b.decode(x), b.decode(x, guidance=True))
    with torch.no_grad():
        assert torch.equal(b.decode(x), b.decode(x, guidance=False))
    # plain sampling is untouched: the final decode runs without autograd
    labels = torch.tensor([0, 1])
    got = sample(b, b.scheduler, labels, torch.Generator().manual_seed(5), 2).images
    want = sample(ref, ref.scheduler, labels, torch.Generator().manual_seed(5), 2).images
    assert torch.allclose(got, want, atol=1e-5)
    sd3 = _load(folders, "sd35m", guidance_decoder="tiny", tiny_vae=str(folders["sd35m-taesd"]))
    assert sd3.tiny_vae.config.shift_factor == pytest.approx(0.0609)


def test_options_are_checked(folders):
    with pytest.raises(ValueError, match="unknown option"):
        _load(folders, "sd15", colour="blue")
    with pytest.raises(ValueError, match="class_names"):
        load_backbone("sd15", str(folders["sd15"]), (8, 8))
    with pytest.raises(ValueError, match="tiny_vae"):
        _load(folders, "dit-xl-2", guidance_decoder="tiny")
    with pytest.raises(ValueError, match="dtype"):
        _load(folders, "dit-xl-2", dtype="fp8")
    with pytest.raises(ValueError, match="prompt_template"):
        _load(folders, "sd15", prompt_template="a photo")
    with pytest.raises(ValueError, match="out of range"):
        _load(folders, "sd15").condition(torch.tensor([3]))
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("sdxl", str(folders["sd15"]), (8, 8))
    with pytest.raises(ValueError, match="unknown option"):
        load_features("clip", str(folders["clip"]), size=3)


def test_compile_and_channels_last_options_sample_the_same(folders, backbones):
    import torch._dynamo

    torch._dynamo.reset()
    b = _load(folders, "sd15", compile={"backend": "eager"}, channels_last=True)
    assert b.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert b.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1])
    got = sample(b, b.scheduler, labels, torch.Generator().manual_seed(5), 2, cfg_scale=2.0).images
    want = sample(backbones["sd15"], backbones["sd15"].scheduler, labels, torch.Generator().manual_seed(5), 2,
                  cfg_scale=2.0).images
    assert torch.allclose(got, want, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the denoiser went through dynamo
    f = load_features("dinov2", str(folders["dinov2"]), compile={"backend": "eager"})
    assert f(torch.rand(2, 3, 8, 8) * 2 - 1).shape[0] == 2


def test_tiny_unet_is_channels_last_by_default_and_samples_the_same(folders):
    fast = load_backbone("tiny", str(folders["tiny"]), (8, 8))
    plain = load_backbone("tiny", str(folders["tiny"]), (8, 8), channels_last=False)
    conv = (b.unet.down_blocks[0].resnets[0].conv1.weight for b in (fast, plain))
    assert [w.is_contiguous(memory_format=torch.channels_last) for w in conv] == [True, False]
    labels = torch.tensor([0, 1, 2])
    got, want = (sample(b, b.scheduler, labels, torch.Generator().manual_seed(3), 3, cfg_scale=2.0).images
                 for b in (fast, plain))
    assert torch.allclose(got, want, atol=1e-4)


def test_bf16_computes_in_bf16_and_returns_float32(folders):
    b = _load(folders, "dit-xl-2", dtype="bf16", gradient_checkpointing=["decoder", "denoiser"])
    assert b.dtype == torch.bfloat16 and b.transformer.dtype == torch.bfloat16
    res = sample(b, b.scheduler, torch.tensor([0, 1]), torch.Generator().manual_seed(0), 2, cfg_scale=2.0)
    assert res.images.dtype == torch.float32 and torch.isfinite(res.images).all()
    assert b.predict(torch.randn(1, 4, 16, 16), b.scheduler.timesteps[0], b.null_condition(1)).dtype == torch.float32


def test_tiny_backbone_still_loads_by_folder(backbones):
    b = backbones["tiny"]
    assert b.noise_shape(2) == (2, 1, 8, 8) and b.num_classes == 10
    res = sample(b, b.scheduler, torch.tensor([1, 2]), torch.Generator().manual_seed(0), 2, cfg_scale=2.0)
    assert res.images.shape == (2, 1, 8, 8)


# ----------------------------------------------------------------------------- feature spaces


@pytest.mark.parametrize("name,dim", [("dinov2", 16), ("clip", 16), ("cnn", 16)])
def test_feature_spaces(folders, feature_spaces, name, dim):
    f = feature_spaces[name]
    shapes = [(2, 1, 8, 8)] if name == "cnn" else [(2, 1, 8, 8), (2, 3, 40, 24), (1, 3, 32, 32)]
    for shape in shapes:
        x = (torch.rand(shape) * 2 - 1).requires_grad_(True)
        out = f(x)
        assert out.shape == (shape[0], dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
        (g,) = torch.autograd.grad(out.square().sum(), x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    if name != "cnn":
        assert f.image_size == (32, 32)  # dinov2: the folder's preprocessor crop; clip: its config
        ck = load_features(name, str(folders[name]), gradient_checkpointing=True)
        x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
        a, b = f(x), ck(x)
        assert torch.allclose(a, b, atol=1e-6)
        (ga,) = torch.autograd.grad(a.sum(), x)
        (gb,) = torch.autograd.grad(b.sum(), x)
        assert torch.allclose(ga, gb, atol=1e-6)


def test_dinov2_preprocessing_is_its_normalisation(feature_spaces):
    f = feature_spaces["dinov2"]
    x = torch.zeros(1, 1, 32, 32)  # mid grey in [-1, 1] -> 0.5 in [0, 1]
    want = ((0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])).view(1, 3, 1, 1)
    assert torch.allclose(f.preprocess(x), want.expand(1, 3, 32, 32), atol=1e-6)
    with torch.no_grad():
        ref = f.model(pixel_values=f.preprocess(x)).pooler_output
    assert torch.allclose(f(x), ref)


# ----------------------------------------------------------------------------- guidance energies


def _energies(refs: torch.Tensor) -> list[Guidance]:
    return [
        Guidance(ChamferEnergy(refs), weight=1.0, name="chamfer"),
        Guidance(OTEnergy(refs[:3], torch.full((3,), 1 / 3)), weight=1.0, name="ot"),
        Guidance(LowDensityEnergy(refs.mean(0), alpha=1.0), weight=1.0, name="lowdensity"),
    ]


@pytest.mark.parametrize("name", ["tiny", *LATENT])
def test_every_energy_on_every_backbone(backbones, feature_spaces, name):
    b, f = backbones[name], feature_spaces[FEATURES_FOR[name]]
    with torch.no_grad():
        refs = f(torch.rand(6, 1, 8, 8) * 2 - 1)
    guidance = _energies(refs)
    labels = torch.tensor([0, 1])
    # the gradient of every energy reaches x_t through denoiser, decoder and features, finite and non-zero
    sched = b.scheduler
    sched.set_timesteps(3)
    t = sched.timesteps[1]
    x = torch.randn(b.noise_shape(2), generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = b.predict(x, t, b.condition(labels))
    x0, _ = predict_x0(sched, out, x, t, 1)
    feats = f(b.decode(x0))
    for j, g in enumerate(guidance):
        value = g.energy(feats, None)
        assert value.dim() == 0 and torch.isfinite(value)
        (grad,) = torch.autograd.grad(value, x, retain_graph=j < len(guidance) - 1)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, g.name
    # and the sampler runs them all, with CFG, through the model and through x0 only
    plain = sample(b, sched, labels, torch.Generator().manual_seed(1), 2, cfg_scale=2.0).images
    for through in ("model", "x0"):
        res = sample(b, sched, labels, torch.Generator().manual_seed(1), 2, cfg_scale=2.0, guidance=guidance,
                     features=f, grad_through=through)
        assert len(res.energy_trace) == 2 * len(guidance)
        assert all(torch.isfinite(torch.tensor(e["value"])) for e in res.energy_trace)
        assert torch.isfinite(res.images).all() and not torch.equal(res.images, plain)


def test_no_warnings_on_load(folders):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _load(folders, "sd15")


@pytest.mark.parametrize("key", ["dit-xl-2", "sd15", "sd35m"])
def test_fused_projections_sample_the_same(folders, backbones, key):
    from diffusers.models.attention_processor import Attention

    b = _load(folders, key, fuse_projections=True)
    attention = [m for m in b.modules()["denoiser"].modules() if isinstance(m, Attention)]
    # SD3.5's joint attention stays unfused (diffusers' fused joint processor has no QK norm)
    assert attention and all(m.fused_projections == (key != "sd35m") for m in attention)
    if key == "dit-xl-2":  # its feed-forward's tanh-GELU input projection now computes in one GEMM
        assert type(b.denoiser.transformer_blocks[0].ff.net[0]).__name__ == "_GELUInGEMM"
    labels = torch.tensor([0, 1])
    got, want = (sample(m, m.scheduler, labels, torch.Generator().manual_seed(5), 2, cfg_scale=2.0).images
                 for m in (b, backbones[key]))
    assert torch.allclose(got, want, atol=1e-4)
    x = torch.randn(b.noise_shape(2), requires_grad=True)  # guided steps differentiate through it
    b.predict(x, 500, b.condition(labels)).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
