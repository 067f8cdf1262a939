"""The reference bank: each class of each split embedded once, resumable, refused when made for other features."""

import json

import numpy as np
import pytest
import torch

from factory.config import from_dict
from factory.data import load_real
from factory.generate import build_features, embed
from factory.shards import encode_images
from factory.stages.references import ReferenceBank, build_reference_bank, real_info


def _cfg(**features):
    return from_dict({"data": {"source": "digits"}, "features": {"name": "cnn", "checkpoint": "digits", **features},
                      "executor": {"num_actors": [1, 1]}})


def test_bank_holds_each_class_embedded_once_and_a_rerun_does_nothing(local_ray, tmp_path):
    cfg = _cfg()
    info = real_info(cfg)
    assert info.size == (8, 8) and info.mode == "L" and info.train_size() == 1347
    meta = build_reference_bank(cfg, str(tmp_path), info, [2, 7], progress=False)
    assert meta["labels"] == [2, 7] and meta["dim"] == 64 and meta["feature_var"] > 0
    bank = ReferenceBank(str(tmp_path))
    train = load_real("digits", "train")
    want = embed(build_features(cfg), torch.from_numpy(train.to_float()[train.labels == 7]))
    assert torch.allclose(bank.features("train", 7), want, atol=1e-6)
    assert len(bank.features("test", 2)) == info.counts["test"][2]
    assert not (tmp_path / "_references" / "train" / "c00003.npy").exists()  # only the run's classes
    files = sorted((tmp_path / "_references").rglob("*.npy"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = build_reference_bank(cfg, str(tmp_path), info, [2, 7], progress=False)
    assert again == meta and [f.stat().st_mtime_ns for f in files] == stamps


def test_a_crashed_bank_resumes_and_a_foreign_bank_is_refused(local_ray, tmp_path):
    cfg = _cfg()
    info = real_info(cfg)
    build_reference_bank(cfg, str(tmp_path), info, [0, 1], progress=False)
    bank = tmp_path / "_references"
    (bank / "meta.json").unlink()  # as if the driver died before the end
    (bank / "test" / "c00001.json").unlink()  # and class 1's test marker was never written
    kept = (bank / "train" / "c00000.npy").stat().st_mtime_ns
    meta = build_reference_bank(cfg, str(tmp_path), info, [0, 1], progress=False)
    assert (bank / "test" / "c00001.json").exists() and (bank / "train" / "c00000.npy").stat().st_mtime_ns == kept
    assert json.loads((bank / "meta.json").read_text()) == meta
    other = _cfg(checkpoint="fashion_mnist")  # other features
    with pytest.raises(ValueError, match="_references was made for"):
        build_reference_bank(other, str(tmp_path), info, [0, 1], progress=False)
    assert np.load(bank / "train" / "c00000.npy").shape == (info.counts["train"][0], 64)


RECIPES = {
    "dmgd": {"images_per_class": 6, "cfg_scale": 2.0, "progressive_batch": 3,
             "energies": [{"name": "ot", "weight": 0.3, "window": [0.1, 0.6], "params": {"K": 4}}]},
    "chamfer": {"images_per_class": 6, "energies": [{"name": "chamfer", "weight": 0.5, "params": {"k": 8}}]},
    "chamfer_km": {"images_per_class": 6, "energies": [{"name": "chamfer", "weight": 0.5, "normalize": "set",
                                                        "params": {"k": 4, "references": "kmeans"}}]},
    "low": {"images_per_class": 6, "energies": [{"name": "lowdensity", "normalize": "linf",
            "params": {"alpha": 0.5, "beta": 0.5, "baseline_per_class": 3}}]},
}


def _recipe_cfg(recipes, seed=0):
    return from_dict({"seed": seed, "data": {"source": "digits", "classes": ["2", "7"]},
                      "features": {"name": "cnn", "checkpoint": "digits"}, "sampling": {"steps": 3, "shard_size": 6},
                      "executor": {"num_actors": [1, 1]}, "recipes": recipes})


def test_bank_fits_each_class_once_and_producers_read_only_their_class(local_ray, tmp_path):
    from factory import guidance
    from factory.bank import class_gaussian, ot_seed
    from factory.generate import SyntheticProducer
    from factory.plan import shard_seed
    from factory.run import build_plan

    cfg = _recipe_cfg({"dmgd": RECIPES["dmgd"]})
    info = real_info(cfg)
    meta = build_reference_bank(cfg, str(tmp_path), info, [2, 7], progress=False)
    bank = ReferenceBank(str(tmp_path))
    feats = bank.features("train", 7)
    mean, cov = bank.gaussian(7)
    want_mean, want_cov = class_gaussian(feats)
    assert np.array_equal(mean, want_mean) and np.array_equal(cov, want_cov) and cov.shape == (64, 64)
    support, masses = guidance.kmeans_support(feats, K=4, seed=ot_seed(0, "dmgd", 7))
    target = bank.target("ot", "dmgd", 4, 7)
    assert np.array_equal(target["support"], support.numpy()) and np.array_equal(target["masses"], masses.numpy())
    labels, means = bank.class_means()
    assert labels == [2, 7] and np.allclose(means[1], want_mean)
    assert not (tmp_path / "_references" / "lowdensity").exists()

    # a recipe added on a rerun: only its files are made, the features are not re-embedded, meta is kept
    stamps = {f: f.stat().st_mtime_ns for f in (tmp_path / "_references").rglob("*") if f.is_file()}
    both = _recipe_cfg(RECIPES)
    assert build_reference_bank(both, str(tmp_path), info, [2, 7], progress=False) == meta
    assert all(f.stat().st_mtime_ns == t for f, t in stamps.items())
    refs = bank.target("chamfer", "chamfer", 8, 2)["references"]
    want = guidance.select_references(bank.features("train", 2), 8, shard_seed(0, "chamfer/chamfer", 2, 0))
    assert refs.shape == (8, 64) and np.array_equal(refs, want.numpy())
    km = bank.target("chamfer_kmeans", "chamfer_km", 4, 2)  # K-means centres with their masses, seeded alike
    support, masses = guidance.kmeans_support(bank.features("train", 2), K=4,
                                              seed=shard_seed(0, "chamfer_km/chamfer", 2, 0) % 2**31)
    assert np.array_equal(km["references"], support.numpy()) and np.array_equal(km["masses"], masses.numpy())
    done = json.loads((tmp_path / "_references" / "lowdensity" / "low" / "done.json").read_text())
    assert done["classes"] == [2, 7] and done["in_dim"] == 64

    # producers reading the bank: no whole train split, no fitting, the same bytes from two actors
    plan = build_plan(both, info)
    one, two = (SyntheticProducer(both.to_dict(), bank=str(tmp_path)) for _ in range(2))
    with pytest.raises(RuntimeError, match="no whole train split"):
        one.train_features
    for recipe in RECIPES:
        shard = plan.shard(plan.recipe_range(recipe)[1])  # class 7
        assert shard.label == 7 and encode_images(one(shard)) == encode_images(two(shard))
    disc = one._discriminators["low"]
    saved = bank.discriminator("low")
    assert all(torch.equal(a, b) for a, b in zip(disc.state_dict().values(), saved.state_dict().values()))
    assert one._class_cache == {}  # OT targets, means and discriminator come fitted: no class's features read

    # more images of the recipe need the same discriminator; another seed's baseline is refused, not reused
    marker = tmp_path / "_references" / "lowdensity" / "low" / "done.json"
    kept = marker.stat().st_mtime_ns
    more = _recipe_cfg({**RECIPES, "low": {**RECIPES["low"], "images_per_class": 9}})
    build_reference_bank(more, str(tmp_path), info, [2, 7], progress=False)
    assert marker.stat().st_mtime_ns == kept
    other = _recipe_cfg(RECIPES, seed=1)
    with pytest.raises(ValueError, match="lowdensity/low holds a discriminator made for"):
        build_reference_bank(other, str(tmp_path), info, [2, 7], progress=False)
