"""The producer: every energy and their mixes on a tiny random model named by folder in the config."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from factory.config import from_dict
from factory.embedded import FeatureCNN, build_unet, scheduler_config, tiny_unet_config
from factory.generate import SyntheticProducer, encoder
from factory.sampler import sample
from factory.run import build_plan
from factory.data import load_real


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    build_unet(tiny_unet_config(8, 1, 10, channels=(16, 32), attention=False)).save_pretrained(root / "unet")
    DDIMScheduler(**scheduler_config()).save_pretrained(root / "scheduler")
    FeatureCNN(1, 10, (8, 8), work_size=8, width=8, feat_dim=16).save(root / "cnn")
    return str(root)


def _cfg(model_dir, recipes):
    return from_dict({
        "data": {"source": "digits", "classes": ["2", "7"]},
        "backbone": {"name": "tiny", "checkpoint": model_dir},
        "features": {"name": "cnn", "checkpoint": model_dir},
        "sampling": {"steps": 4, "shard_size": 6},
        "recipes": recipes,
    })


RECIPES = {
    "chamfer": {"images_per_class": 6, "energies": [{"name": "chamfer", "weight": 0.5, "params": {"k": 8}}]},
    "dmgd": {"images_per_class": 12, "cfg_scale": 4.0, "soft_labels": {}, "progressive_batch": 3,
             "energies": [{"name": "ot", "weight": 0.3, "window": [0.1, 0.6], "params": {"K": 4}}]},
    "lowdensity": {"images_per_class": 6, "energies": [{"name": "lowdensity", "normalize": "linf",
                   "params": {"alpha": 0.5, "beta": 0.5, "baseline_per_class": 8}}]},
    "mix": {"images_per_class": 6, "init_strength": 0.6, "grad_through": "x0", "energies": [
        {"name": "chamfer", "weight": 0.5, "every": 2, "params": {"k": 4}},
        {"name": "ot", "weight": 0.2, "params": {"K": 3}}]},
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_energy_makes_a_finite_shard(model_dir, recipe):
    cfg = _cfg(model_dir, {recipe: RECIPES[recipe]})
    plan = build_plan(cfg, load_real("digits", "train"))
    producer = SyntheticProducer(cfg)
    shard = plan.shard(0)
    images = producer.sample_shard(shard)
    assert images.shape == (shard.num_images, 1, 8, 8) and torch.isfinite(images).all()
    records = producer(shard)
    assert [r["label"] for r in records] == [2] * shard.num_images
    assert all(r["image"].dtype == np.uint8 and r["image"].shape == (8, 8) for r in records)  # pixels, not bytes
    encoded = encoder(cfg)(records)
    assert [r["image"][:8] for r in encoded] == [b"\x89PNG\r\n\x1a\n"] * shard.num_images


def test_guidance_changes_the_samples(model_dir):
    cfg = _cfg(model_dir, {"cfg": {"images_per_class": 6}, "chamfer": RECIPES["chamfer"]})
    plan = build_plan(cfg, load_real("digits", "train"))
    producer = SyntheticProducer(cfg)
    plain = producer.sample_shard(plan.shard(0))
    guided_shard = plan.shard(plan.recipe_range("chamfer")[0])
    guided = producer.sample_shard(guided_shard)
    # same class, different recipe seed and guidance: the batches differ
    assert not torch.equal(plain, guided)


@pytest.mark.parametrize("recipe", ["chamfer", "dmgd"])
def test_candidates_keep_the_images_whose_set_the_energy_prefers(model_dir, recipe):
    one = _cfg(model_dir, {recipe: RECIPES[recipe]})
    three = _cfg(model_dir, {recipe: {**RECIPES[recipe], "candidates": 3}})
    shard = build_plan(one, load_real("digits", "train")).shard(0)
    first, producer = SyntheticProducer(one).sample_shard(shard), SyntheticProducer(three)
    chosen = producer.sample_shard(shard)
    assert chosen.shape == first.shape
    energy = producer.guidance_for(shard)[0].energy
    with torch.no_grad():
        assert energy(producer.features(chosen)) < energy(producer.features(first))  # the first draw is a candidate
    assert torch.equal(SyntheticProducer(three).sample_shard(shard), chosen)  # a function of config and shard


def test_soft_labels_mixed_in_the_outputs_change_only_the_soft_stage(model_dir):
    """mix: output differs from the paper's embedding interpolation exactly when some step is in the soft stage
    (4 steps: t_frac 1, 0.75, 0.5, 0.25; explore_from 1 and refine_until 0.8 leave none there)."""
    def shard_of(**soft):
        cfg = _cfg(model_dir, {"dmgd": {"images_per_class": 6, "cfg_scale": 4.0,
                                        "soft_labels": {"baseline": "unconditional", **soft}}})
        return SyntheticProducer(cfg).sample_shard(build_plan(cfg, load_real("digits", "train")).shard(0))

    assert torch.equal(shard_of(explore_from=1.0, refine_until=0.8),
                       shard_of(explore_from=1.0, refine_until=0.8, mix="output"))
    embedding, output = shard_of(), shard_of(mix="output")
    assert torch.isfinite(output).all() and not torch.equal(embedding, output)


def test_progressive_shards_are_independent_of_order_and_resume(model_dir):
    cfg = _cfg(model_dir, {"dmgd": RECIPES["dmgd"]})
    plan = build_plan(cfg, load_real("digits", "train"))
    assert len(plan) == 4  # 2 classes x 2 shards of 6
    one, finish = SyntheticProducer(cfg), encoder(cfg)
    in_order = [finish(one(plan.shard(i))) for i in range(len(plan))]
    resumed = SyntheticProducer(cfg)  # a fresh actor after a crash, starting midway
    for i in (3, 2):
        assert finish(resumed(plan.shard(i))) == in_order[i]
    assert in_order[0] != in_order[1]


def test_ot_shards_partition_the_class_mass(model_dir):
    from factory import guidance

    cfg = _cfg(model_dir, {"dmgd": RECIPES["dmgd"]})
    plan = build_plan(cfg, load_real("digits", "train"))
    producer = SyntheticProducer(cfg)
    from factory.plan import shard_seed

    _, masses = guidance.kmeans_support(producer._class_features(2), K=4, seed=shard_seed(0, "dmgd/ot", 2, 0) % 2**31)
    total = {}
    for i in (0, 1):  # the two shards of class "2", 6 of its 12 images each
        e = producer.guidance_for(plan.shard(i))[0].energy
        for row, m in zip(e.support, e.masses):
            key = tuple(np.round(row.numpy(), 4))
            total[key] = total.get(key, 0.0) + 0.5 * float(m)
    assert len(total) == len(masses) == 4
    assert sorted(total.values()) == pytest.approx(sorted(masses.tolist()), abs=1e-5)


def test_sampling_batch_size_splits_a_shard_and_auto_is_the_whole_shard_on_a_cpu(model_dir):
    recipes = {"chamfer": RECIPES["chamfer"]}
    whole = _cfg(model_dir, recipes)
    plan = build_plan(whole, load_real("digits", "train"))
    shard = plan.shard(0)
    finish = encoder(whole)
    want = finish(SyntheticProducer(whole)(shard))
    auto = whole.model_copy(deep=True)
    auto.sampling.batch_size = "auto"
    producer = SyntheticProducer(auto)
    assert finish(producer(shard)) == want and producer._fitted_batch == {"chamfer": 6}

    split = whole.model_copy(deep=True)
    split.sampling.batch_size = 4
    one, two = SyntheticProducer(split), SyntheticProducer(split)
    assert one.batch_for(shard, one.backbone, one.guidance_for(shard)) == 4
    got = finish(one(shard))
    assert len(got) == shard.num_images and got == finish(two(shard))  # 4 + 2, the same bytes every time
    assert got != want  # Chamfer's coverage couples a batch: two calls guide differently from one


def test_the_memory_probe_runs_as_wide_a_pass_as_an_output_mixed_soft_label(model_dir):
    """batch_size: auto measures one step; with soft labels mixed in the outputs the denoiser sees 3 conditions a
    step, not CFG's 2, so the probe must batch as many or the fitted batch overshoots the GPU."""
    labels = torch.tensor([2, 2])
    widths = {}
    for mix in ("embedding", "output"):
        cfg = _cfg(model_dir, {"dmgd": {"images_per_class": 6, "cfg_scale": 4.0, "soft_labels": {"mix": mix}}})
        producer = SyntheticProducer(cfg)
        backbone, calls = producer.backbone, []
        orig = backbone.predict
        backbone.predict = lambda x, t, cond: calls.append(x.shape[0]) or orig(x, t, cond)
        condition = producer._widest_condition(cfg.recipes["dmgd"], labels, backbone)
        sample(backbone, backbone.scheduler, labels, torch.Generator().manual_seed(0), 1, cfg_scale=4.0,
               condition=condition)
        widths[mix] = calls
    assert widths == {"embedding": [4], "output": [6]}
