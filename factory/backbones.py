"""Denoiser backbones behind the sampler's small interface (see ``factory.sampler.Backbone``).

A backbone conditions by *embedding tensors*, not ids, so that DMGD's soft labels can interpolate
them: ``condition(labels)`` returns the class embeddings, ``predict`` feeds them straight to the model.

- ``tiny``: the embedded class-conditional ``UNet2DModel`` (pixel space; the last class id is the
  null class used for classifier-free guidance), loaded with ``from_pretrained`` from the packaged
  weights or a local folder.
"""

from __future__ import annotations

import torch
from torch import nn

from factory import embedded


class _EmbeddingPassThrough(nn.Module):
    """Wraps a class ``nn.Embedding``: integer ids are looked up, float tensors are used as embeddings."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.is_floating_point() else self.embedding(x)


class TinyBackbone:
    latent = False

    def __init__(self, unet, scheduler, real_size: tuple[int, int]):
        self.unet = unet.eval().requires_grad_(False)
        if not isinstance(unet.class_embedding, _EmbeddingPassThrough):
            unet.class_embedding = _EmbeddingPassThrough(unet.class_embedding)
        self.scheduler = scheduler
        self.real_size = tuple(real_size)
        self.sample_size = unet.config.sample_size
        self.null_id = unet.config.num_class_embeds - 1

    @property
    def num_classes(self) -> int:
        return self.null_id

    def noise_shape(self, batch: int) -> tuple[int, ...]:
        s = self.sample_size
        s = (s, s) if isinstance(s, int) else tuple(s)
        return (batch, self.unet.config.in_channels, *s)

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        return self.unet.class_embedding.embedding(labels.long())

    def null_condition(self, batch: int) -> torch.Tensor:
        return self.condition(torch.full((batch,), self.null_id, dtype=torch.long))

    def predict(self, x: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, class_labels=cond).sample

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return embedded.to_real_size(x0, self.real_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return embedded.to_model_space(images, self.sample_size)


def load_backbone(name: str, checkpoint: str, real_size: tuple[int, int]):
    """Build the backbone ``name`` from ``checkpoint`` (a packaged name, a local folder or a hub id)."""
    if name == "tiny":
        return TinyBackbone(embedded.load_unet(checkpoint), embedded.load_scheduler(checkpoint), real_size)
    raise ValueError(f"unknown backbone {name!r}")


def load_features(name: str, checkpoint: str):
    """A differentiable feature extractor: pixels in [-1, 1] at the real size -> (B, D) features."""
    if name == "cnn":
        return embedded.load_cnn(checkpoint).eval().requires_grad_(False)
    raise ValueError(f"unknown feature space {name!r}")
