"""The shard plan: (recipe, class, shard index) -> seed, image count and file names, computed, never stored.

A plan is arithmetic over a few per-recipe numbers, so a plan of 13M images (10x ImageNet-1k) is
built in microseconds and any shard is looked up by its global id in O(log recipes). Nothing in it
depends on timing, workers or order: a shard's identity and seed are a function of the config alone.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    shard_id: int  # global position in the plan
    recipe: str
    label: int  # class id
    class_name: str
    index: int  # shard index within (recipe, class)
    num_images: int
    first_image: int  # index of this shard's first image within (recipe, class)
    seed: int

    @property
    def name(self) -> str:
        """Deterministic file stem, e.g. ``c00003-s00002``."""
        return f"c{self.label:05d}-s{self.index:05d}"

    def key(self, i: int) -> str:
        """Sample key of image ``i`` of this shard (no dots, so WebDataset can split extensions)."""
        return f"{self.recipe}_c{self.label:05d}_{self.first_image + i:07d}"


def shard_seed(run_seed: int, recipe: str, label: int, index: int) -> int:
    """63-bit seed from (run seed, recipe, class, shard index), stable across machines and versions."""
    h = hashlib.sha256(f"{run_seed}/{recipe}/{label}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class RecipePlan:
    recipe: str
    images_per_class: int
    shard_size: int

    @property
    def shards_per_class(self) -> int:
        return math.ceil(self.images_per_class / self.shard_size)


class Plan:
    """Shards of several recipes over a fixed list of classes, in (recipe, class, index) order."""

    def __init__(self, recipes: list[RecipePlan], labels: list[int], class_names: list[str], seed: int):
        if not labels:
            raise ValueError("a plan needs at least one class")
        self.recipes = list(recipes)
        self.labels = list(labels)
        self.class_names = list(class_names)  # indexed by label
        self.seed = seed
        counts = [r.shards_per_class * len(self.labels) for r in self.recipes]
        self._offsets = [0]
        for c in counts:
            self._offsets.append(self._offsets[-1] + c)

    def __len__(self) -> int:
        return self._offsets[-1]

    @property
    def num_images(self) -> int:
        return sum(r.images_per_class * len(self.labels) for r in self.recipes)

    def shard(self, shard_id: int) -> Shard:
        if not 0 <= shard_id < len(self):
            raise IndexError(f"shard id {shard_id} outside the plan of {len(self)} shards")
        r = bisect.bisect_right(self._offsets, shard_id) - 1
        rp = self.recipes[r]
        local = shard_id - self._offsets[r]
        class_pos, index = divmod(local, rp.shards_per_class)
        label = self.labels[class_pos]
        first = index * rp.shard_size
        n = min(rp.shard_size, rp.images_per_class - first)
        return Shard(
            shard_id=shard_id,
            recipe=rp.recipe,
            label=label,
            class_name=self.class_names[label],
            index=index,
            num_images=n,
            first_image=first,
            seed=shard_seed(self.seed, rp.recipe, label, index),
        )

    def recipe_range(self, recipe: str) -> range:
        r = [p.recipe for p in self.recipes].index(recipe)
        return range(self._offsets[r], self._offsets[r + 1])

    def __iter__(self):
        return (self.shard(i) for i in range(len(self)))


def images_per_class(scale: float, explicit: int | None, train_size: int, num_classes: int) -> int:
    """Images per class: explicit, or ``ceil(scale * train_size / num_classes)`` (1x = the train size)."""
    if explicit is not None:
        return explicit
    return max(1, math.ceil(scale * train_size / num_classes))
