"""The job configs under jobs/: each validates, plans to the expected size (the 13M-image one at once, with no
data read), and the cluster jobs run end to end on local Ray once their backbone, features and data are
swapped for tiny local ones and their plan shrunk (everything else, recipes and model options included, as
written)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from factory.config import load_config
from factory.plan import estimate, format_estimate, plan_for_config

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
CLUSTER_JOBS = ["imagenet100_chamfer_sd15", "imagenet1k_10x_dit", "woof_dmgd_dit", "nette_dmgd_dit"]
# classes, shards, images
EXPECTED = {
    "imagenet100_chamfer_sd15": (100, 100 * 13, 100 * 1300),
    "imagenet1k_10x_dit": (1000, 1000 * 13, 1000 * 12812),
    "woof_dmgd_dit": (10, 2 * 10, 10 * (10 + 50)),
    "nette_dmgd_dit": (10, 2 * 10, 10 * (10 + 50)),
}
IMAGENET_TRAIN = 1_281_167


def _job(name: str) -> Path:
    return ROOT / "jobs" / f"{name}.yaml"


def test_the_cluster_jobs_exist():
    missing = [n for n in CLUSTER_JOBS if not _job(n).is_file()]
    assert not missing, f"missing job configs: {missing}"


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_job_validates_and_plans(path):
    cfg = load_config(path)
    assert cfg.name == path.stem, f"{path.name}: name {cfg.name!r} differs from the file name"
    plan = plan_for_config(cfg)  # reads the real train split only when the config does not declare its sizes
    assert len(plan) >= 1 and plan.num_images >= 1
    per_recipe = {r.recipe: r for r in plan.recipes}
    assert set(per_recipe) == set(cfg.recipes)
    assert plan.num_images == sum(r.images_per_class for r in plan.recipes) * len(plan.labels)
    last = plan.shard(len(plan) - 1)
    assert last.first_image + last.num_images == per_recipe[last.recipe].images_per_class


@pytest.mark.parametrize("name", CLUSTER_JOBS)
def test_cluster_job_plan_sizes(name):
    cfg = load_config(_job(name))
    plan = plan_for_config(cfg)
    assert (len(plan.labels), len(plan), plan.num_images) == EXPECTED[name]
    assert cfg.executor.num_gpus == 1 and cfg.executor.num_actors[0] < cfg.executor.num_actors[1]
    assert cfg.output.formats == ["parquet", "webdataset"]
    assert cfg.data.root.startswith("s3://") and cfg.data.source == "parquet"
    assert cfg.features.name == "dinov2"
    est = estimate(cfg)  # h100 by default for GPU jobs: FLOP counts at the MFU the GPU suite measured
    assert est["device"]["key"] == "h100" and all(r["rate"] == "measured-mfu" for r in est["recipes"])
    assert est["device_hours"] > 0 and est["cost"]["on_demand"] > est["cost"]["spot"] > 0


def test_imagenet_1k_10x_is_ten_times_the_train_split():
    cfg = load_config(_job("imagenet1k_10x_dit"))
    (recipe,) = cfg.recipes.values()
    assert recipe.images_per_class == -(-10 * IMAGENET_TRAIN // 1000)  # ceil: 12,812
    assert cfg.backbone.name == "dit-xl-2" and cfg.backbone.checkpoint == "facebook/DiT-XL-2-256"
    assert "class_ids" in cfg.backbone.options and cfg.backbone.options["class_ids"] is None


def test_imagenet100_is_the_cmc_subset_with_a_prompt_per_class():
    cfg = load_config(_job("imagenet100_chamfer_sd15"))
    classes = cfg.data.classes
    assert len(classes) == len(set(classes)) == 100 and classes == sorted(classes)
    # a few of CMC's imagenet100.txt (github.com/HobbitLong/CMC), first and last lines included
    assert {"n02869837", "n01749939", "n02488291", "n02090622", "n01855672"} <= set(classes)
    assert len(cfg.backbone.options["class_names"]) == 100
    assert cfg.backbone.checkpoint == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    (recipe,) = cfg.recipes.values()
    (e,) = recipe.energies
    assert (e.name, e.every, e.params.k, recipe.cfg_scale) == ("chamfer", 5, 32, 1.0)


@pytest.mark.parametrize("name, names", [
    ("woof_dmgd_dit", ["Shih-Tzu", "Rhodesian ridgeback", "beagle", "English foxhound", "Border terrier",
                       "Australian terrier", "golden retriever", "Old English sheepdog", "Samoyed", "dingo"]),
    ("nette_dmgd_dit", ["tench", "English springer", "cassette player", "chain saw", "church", "French horn",
                        "garbage truck", "gas pump", "golf ball", "parachute"]),
])
def test_dmgd_jobs_map_their_classes_to_the_right_imagenet_ids(name, names):
    categories = pytest.importorskip("torchvision.models._meta")._IMAGENET_CATEGORIES
    cfg = load_config(_job(name))
    ids = cfg.backbone.options["class_ids"]
    assert len(ids) == len(cfg.data.classes) == 10 and ids == sorted(ids)  # sorted WordNet ids = sorted indices
    assert [categories[i] for i in ids] == names
    assert {r: c.images_per_class for r, c in cfg.recipes.items()} == {"dmgd_ipc10": 10, "dmgd_ipc50": 50}
    for r in cfg.recipes.values():
        assert r.cfg_scale == 4.0 and r.progressive_batch == 1
        assert r.soft_labels.model_dump(exclude_unset=True) == {"beta_s": 0.01, "beta_n": 0.06}
        (e,) = r.energies
        assert e.name == "ot" and e.params.model_dump(exclude_unset=True) == {"K": 10, "reg": 0.1, "num_iter": 5}
        assert e.window == [0.1, 0.4]


def test_the_13m_image_plan_and_estimate():
    # its speed (0.26 s for `factory plan` on this job) is a benchmark figure, not asserted here
    cfg = load_config(_job("imagenet1k_10x_dit"))
    plan = plan_for_config(cfg)
    text = format_estimate(estimate(cfg, plan=plan))
    last = plan.shard(len(plan) - 1)
    assert plan.num_images == 12_812_000 >= 10 * IMAGENET_TRAIN
    assert (last.label, last.index, last.num_images) == (999, 12, 812)
    assert "12,812,000" in text and "GPU-hours" in text


# ------------------------------------------------------------------------------------- the rehearsal


def _shrink(name: str) -> list[str]:
    """--set overrides that shrink a job's plan to 3 classes x 3 images; recipes otherwise as written."""
    raw = yaml.safe_load(_job(name).read_text())
    sets = ["sampling.steps=5", "sampling.shard_size=2", "eval.k=2"]
    if raw["data"].get("classes") is not None:
        sets.append(f"data.classes=[{', '.join(raw['data']['classes'][:3])}]")  # the job's first classes
    if raw["data"].get("num_classes") is not None:
        sets.append("data.num_classes=3")
    for recipe, r in raw["recipes"].items():
        sets.append(f"recipes.{recipe}.images_per_class=3")  # two shards per class: one of 2, one of 1
        if r.get("progressive_batch", 0) > 1:
            sets.append(f"recipes.{recipe}.progressive_batch=1")
    return sets


@pytest.mark.parametrize("name", ["imagenet100_chamfer_sd15", "imagenet1k_10x_dit", "woof_dmgd_dit"])
def test_cluster_job_rehearses_end_to_end(name, local_ray, tmp_path):
    """``--rehearse``: the job with tiny random models of its kinds (saved as folders, loaded by the real
    from_pretrained path), a generated real set with its classes, and local CPUs; everything else as written."""
    from factory.generate import build_backbone
    from factory.rehearse import rehearsal_overrides
    from factory.run import run
    from factory.stages.references import real_info

    raw = yaml.safe_load(_job(name).read_text())
    out = tmp_path / "out"
    shrink = _shrink(name)
    cfg = load_config(_job(name), rehearsal_overrides(load_config(_job(name), shrink), str(out)) + shrink)
    assert cfg.recipes.keys() == raw["recipes"].keys() and cfg.executor.num_gpus == 0
    assert cfg.data.source == "parquet" and (out / "_rehearsal" / "data" / "classes.json").is_file()

    # the job's own backbone options at work: prompts from its class names, DiT ids from its class_ids
    info = real_info(cfg)
    assert info.num_classes == 3 and info.mode == "RGB" and info.size == (32, 32)
    backbone = build_backbone(cfg, info)
    if cfg.backbone.name == "sd15":
        assert backbone.prompt(0) == "a photo of a " + cfg.backbone.options["class_names"][0]
    elif cfg.backbone.options["class_ids"] is None:  # label i = ImageNet class i
        assert backbone.class_ids.tolist() == list(range(1000))
    else:
        assert backbone.class_ids.tolist() == cfg.backbone.options["class_ids"]
    assert plan_for_config(cfg).num_images == 3 * 3 * len(cfg.recipes)

    metrics = run(cfg, str(out), progress=False)
    for recipe in cfg.recipes:
        assert metrics[recipe]["num_images"] == 9 and set(metrics[recipe]["count_per_class"].values()) == {3}
        assert np.isfinite(metrics[recipe]["fd"]) and len(metrics[recipe]["per_class"]) == 3
        assert len(list((out / recipe / "parquet").glob("*.parquet"))) == 6  # 3 classes x 2 shards
        assert len(list((out / recipe / "webdataset").glob("*.tar"))) == 6
    assert (out / "report.html").is_file()
