"""Checks before any work, on metadata only: a run that cannot finish fails here, before anything is written.

Nothing here loads a weight or decodes an image (the driver holds no model). A checkpoint is checked by what a
loader would open: a packaged name or a local folder must have its config and weights files; a hub id
("org/name") is accepted as it is, because no hub is reachable from here (its loader fails in the actor if it is
wrong). The real data's classes and counts are ``real_info``'s (the plan already needs them).
"""

from __future__ import annotations

import re
from pathlib import Path

from factory import embedded
from factory.config import Config, ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHTS = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
           "diffusion_pytorch_model.bin", "model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json",
           "pytorch_model.bin.index.json")
# what each latent backbone's loader opens in a pipeline folder: (sub-folder, a file it must hold)
PIPELINE_PARTS = {
    "sd15": [("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
             ("tokenizer", None), ("scheduler", "scheduler_config.json")],
    "sd35m": [("transformer", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
              ("text_encoder_2", "config.json"), ("tokenizer", None), ("tokenizer_2", None),
              ("scheduler", "scheduler_config.json")],
    "dit-xl-2": [("transformer", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")],
}


def is_hub_id(checkpoint: str) -> bool:
    """``org/name`` that is no local folder: a Hugging Face hub id (not checked: no hub is reachable here)."""
    s = str(checkpoint)
    return bool(HUB_ID.match(s)) and not Path(s).expanduser().exists()


def _weights_folder(folder: Path, what: str) -> None:
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{what}: {folder} has no config.json")
    if not any((folder / w).is_file() for w in WEIGHTS):
        raise ConfigError(f"{what}: {folder} has no weights file (one of {', '.join(WEIGHTS)})")


def _local_folder(checkpoint: str, what: str) -> Path | None:
    """The checkpoint's local folder; None for a hub id; a clear error for a path that is not there."""
    if is_hub_id(checkpoint):
        return None
    folder = Path(str(checkpoint)).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{what}: checkpoint {checkpoint!r} is neither a local folder nor a hub id (org/name)")
    return folder


def check_backbone(cfg: Config) -> list[str]:
    """The backbone's checkpoint (and its tiny VAE, LoRA adapter) present; returns notes on what was not checked."""
    b, notes = cfg.backbone, []
    if b.name == "tiny":
        embedded._resolve(b.checkpoint, "unet", "config.json")  # "no unet checkpoint for ...: expected ..."
        embedded._resolve(b.checkpoint, "scheduler", "scheduler_config.json")
    elif b.name in PIPELINE_PARTS:
        folder = _local_folder(b.checkpoint, "backbone.checkpoint")
        if folder is None:
            notes.append(f"backbone.checkpoint {b.checkpoint!r}: a hub id, not checked (no hub reachable here)")
        else:
            parts = list(PIPELINE_PARTS[b.name])
            if b.name == "sd35m" and b.options.get("use_t5"):
                parts += [("text_encoder_3", "config.json"), ("tokenizer_3", None)]
            for part, marker in parts:
                where = folder / part
                if not where.is_dir() or (marker and not (where / marker).is_file()):
                    raise ConfigError(f"backbone.checkpoint: {folder} has no {part}/"
                                      f"{marker or ''} (a {b.name} pipeline folder as save_pretrained writes it)")
                if part in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
                    _weights_folder(where, "backbone.checkpoint")
    else:
        raise ConfigError(f"backbone.name: unknown backbone {b.name!r}; expected tiny, {', '.join(PIPELINE_PARTS)}")
    if b.options.get("guidance_decoder") == "tiny":
        where = b.options.get("tiny_vae")
        if not where:
            raise ConfigError("backbone.options.tiny_vae: guidance_decoder 'tiny' needs it (an AutoencoderTiny)")
        folder = _local_folder(where, "backbone.options.tiny_vae")
        if folder is not None:
            _weights_folder(folder / "vae" if (folder / "vae").is_dir() else folder, "backbone.options.tiny_vae")
    if b.options.get("lora"):
        notes += check_adapter(str(b.options["lora"]), "backbone.options.lora")
    return notes


def check_adapter(path: str, what: str) -> list[str]:
    """A LoRA adapter folder (or URI) holding what ``factory.lora.load_adapter`` reads."""
    import fsspec

    from factory.lora import ADAPTER_FILES

    fs, root = fsspec.core.url_to_fs(path)
    missing = [f for f in ADAPTER_FILES if not fs.isfile(f"{root.rstrip('/')}/{f}")]
    if missing:
        raise ConfigError(f"{what}: adapter {path} has no {', '.join(missing)}")
    return []


def check_features(cfg: Config) -> list[str]:
    f = cfg.features
    if f.name == "cnn":
        folder = embedded._resolve(f.checkpoint, "cnn", "model.safetensors")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"features.checkpoint: {folder} has no config.json")
        return []
    if f.name not in ("dinov2", "clip"):
        raise ConfigError(f"features.name: unknown feature space {f.name!r}; expected cnn, dinov2 or clip")
    if not f.checkpoint:  # the loader's default hub model
        return [f"features: the default {f.name} hub model, not checked (no hub reachable here)"]
    folder = _local_folder(f.checkpoint, "features.checkpoint")
    if folder is None:
        return [f"features.checkpoint {f.checkpoint!r}: a hub id, not checked (no hub reachable here)"]
    _weights_folder(folder, "features.checkpoint")
    return []


def check_checkpoints(cfg: Config) -> list[str]:
    """Every model the run will load, present (metadata only). Returns notes on hub ids left unchecked."""
    return check_backbone(cfg) + check_features(cfg)
