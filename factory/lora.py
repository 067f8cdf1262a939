"""Loading a Real-Fake LoRA adapter into a denoiser: the piece of :mod:`factory.realfake` a backbone needs.

Apart from the fine-tuning (Ray Train) so that the backbones, a lower layer, can merge an adapter without
importing the stage that makes it.
"""

from __future__ import annotations

import os
import tempfile

from torch import nn

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what PeftModel.save_pretrained writes


def local_folder(path: str) -> str:
    """A local folder holding the adapter at ``path`` (a folder or an fsspec URI; remote: downloaded)."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, root = fsspec.core.url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        return root
    local = tempfile.mkdtemp(prefix="factory-lora-")
    for name in ADAPTER_FILES:
        fs.get_file(f"{root.rstrip('/')}/{name}", os.path.join(local, name))
    return local


def load_adapter(denoiser: nn.Module, path: str) -> nn.Module:
    """Load the LoRA adapter folder (or URI) ``path`` into ``denoiser`` and merge it into the weights.

    The module is changed in place (same object, same layer types, merged weights; frozen, eval mode)
    and returned.
    """
    from peft import PeftModel

    folder = local_folder(path)
    missing = [f for f in ADAPTER_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"{path}: not a LoRA adapter folder (missing {', '.join(missing)})")
    model = PeftModel.from_pretrained(denoiser, folder, is_trainable=False)
    merged = model.merge_and_unload()
    return merged.eval().requires_grad_(False)
