"""The reference bank: each class of each split embedded once, resumable, refused when made for other features."""

import json

import numpy as np
import pytest
import torch

from factory.config import from_dict
from factory.data import load_real
from factory.generate import build_features, embed
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
    other = _cfg(options={"work_size": 16})
    with pytest.raises(ValueError, match="_references was made for"):
        build_reference_bank(other, str(tmp_path), info, [0, 1], progress=False)
    assert np.load(bank / "train" / "c00000.npy").shape == (info.counts["train"][0], 64)
