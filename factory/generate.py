"""The shard producer: where the data plane meets diffusion. One instance per actor, one call per shard.

``SyntheticProducer(config)(shard)`` samples the shard's images with the recipe's guidance and returns
its records (PNG bytes at the real set's size and mode, label, class name, seed). The content is a
function of (config, shard) alone: the initial noise comes from a generator seeded by the shard's seed,
torch runs on a fixed number of threads, and the energies are built from the train split with seeds
derived from the run seed.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from factory.backbones import load_backbone, load_features
from factory.config import Config, EnergyConfig, from_dict
from factory.data import load_real
from factory.plan import Shard, shard_seed
from factory.sampler import Guidance, sample


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Pixels in [-1, 1], (B, C, H, W) -> uint8 (B, H, W) for one channel, (B, H, W, 3) for three."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


@torch.no_grad()
def embed(features, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([features(images[i: i + batch]) for i in range(0, len(images), batch)])


class SyntheticProducer:
    def __init__(self, config: dict | Config):
        self.cfg = config if isinstance(config, Config) else from_dict(config)
        torch.set_num_threads(self.cfg.executor.torch_threads)
        data = self.cfg.data
        self.train = load_real(data.source, "train", data.root)
        self.backbone = load_backbone(self.cfg.backbone.name, self.cfg.backbone.checkpoint, self.train.size)
        self.features = load_features(self.cfg.features.name, self.cfg.features.checkpoint)
        self._train_features: torch.Tensor | None = None
        self._guidance: dict[tuple[str, int], list[Guidance]] = {}

    @property
    def train_features(self) -> torch.Tensor:
        if self._train_features is None:
            self._train_features = embed(self.features, torch.from_numpy(self.train.to_float()))
        return self._train_features

    def _energy(self, e: EnergyConfig, recipe: str, label: int):
        from factory import guidance

        feats = self.train_features[torch.from_numpy(self.train.labels == label)]
        seed = shard_seed(self.cfg.seed, f"{recipe}/{e.name}", label, 0)
        p = dict(e.params)
        if e.name == "chamfer":
            refs = guidance.chamfer.select_references(feats, int(p.pop("k", 32)), seed)
            return guidance.chamfer.ChamferEnergy(refs, **p)
        if e.name == "ot":
            support, masses = guidance.ot.kmeans_support(feats, K=int(p.pop("K", 10)), seed=seed % 2**31)
            return guidance.ot.OTEnergy(support, masses, **p)
        raise ValueError(f"energy {e.name!r} is not available in this build")

    def guidance_for(self, recipe: str, label: int) -> list[Guidance]:
        key = (recipe, label)
        if key not in self._guidance:
            self._guidance[key] = [
                Guidance(self._energy(e, recipe, label), e.weight, e.every, tuple(e.window), e.normalize, e.name)
                for e in self.cfg.recipes[recipe].energies
            ]
        return self._guidance[key]

    def sample_shard(self, shard: Shard) -> torch.Tensor:
        recipe = self.cfg.recipes[shard.recipe]
        generator = torch.Generator().manual_seed(shard.seed)
        labels = torch.full((shard.num_images,), shard.label, dtype=torch.long)
        guidance = self.guidance_for(shard.recipe, shard.label)
        result = sample(
            self.backbone, self.backbone.scheduler, labels, generator, self.cfg.sampling.steps,
            cfg_scale=recipe.cfg_scale, guidance=guidance, features=self.features if guidance else None,
            eta=self.cfg.sampling.eta,
        )
        if not torch.isfinite(result.images).all():
            raise FloatingPointError(f"shard {shard.recipe}/{shard.name}: sampling produced NaN or Inf")
        return result.images

    def __call__(self, shard: Shard) -> list[dict]:
        arrays = to_uint8(self.sample_shard(shard))
        return [
            {"key": shard.key(i), "image": png_bytes(a), "label": shard.label,
             "class_name": shard.class_name, "seed": shard.seed}
            for i, a in enumerate(arrays)
        ]
