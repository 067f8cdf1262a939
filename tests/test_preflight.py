"""The run's pre-flight reads metadata only: checkpoints present as files, hub ids accepted unchecked."""

import json

import pytest

from factory.config import ConfigError, from_dict
from factory.preflight import check_adapter, check_checkpoints


def _cfg(**parts):
    return from_dict({"name": "t", "data": {"source": "digits"}, **parts})


def test_packaged_models_pass_and_hub_ids_are_noted_not_checked():
    assert check_checkpoints(_cfg()) == []
    notes = check_checkpoints(_cfg(backbone={"name": "sd15", "checkpoint": "org/some-sd15"},
                                   features={"name": "dinov2", "checkpoint": "facebook/dinov2-small"}))
    assert len(notes) == 2 and all("not checked (no hub reachable here)" in n for n in notes)


def _pipeline(root, parts):
    for part in parts:
        (root / part).mkdir(parents=True)
        if part == "scheduler":
            (root / part / "scheduler_config.json").write_text("{}")
        elif not part.startswith("tokenizer"):
            (root / part / "config.json").write_text("{}")
            (root / part / "model.safetensors").write_bytes(b"")
    return str(root)


def test_a_local_pipeline_folder_missing_a_part_is_named(tmp_path):
    whole = _pipeline(tmp_path / "dit", ["transformer", "vae", "scheduler"])
    assert check_checkpoints(_cfg(backbone={"name": "dit-xl-2", "checkpoint": whole})) == []
    partial = _pipeline(tmp_path / "sd", ["unet", "text_encoder", "tokenizer", "scheduler"])
    with pytest.raises(ConfigError, match="has no vae/config.json"):
        check_checkpoints(_cfg(backbone={"name": "sd15", "checkpoint": partial}))
    (tmp_path / "dit" / "vae" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="vae has no weights file"):
        check_checkpoints(_cfg(backbone={"name": "dit-xl-2", "checkpoint": whole}))


def test_missing_local_checkpoints_and_adapters_are_named(tmp_path):
    with pytest.raises(ValueError, match="no unet checkpoint for '/no/such'"):
        check_checkpoints(_cfg(backbone={"name": "tiny", "checkpoint": "/no/such"}))
    with pytest.raises(ValueError, match="no cnn checkpoint"):
        check_checkpoints(_cfg(features={"name": "cnn", "checkpoint": str(tmp_path)}))
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({}))
    with pytest.raises(ConfigError, match="has no adapter_model.safetensors"):
        check_adapter(str(adapter), "backbone.options.lora")
