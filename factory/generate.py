"""The shard producer: where the data plane meets diffusion. One instance per actor, one call per shard.

``SyntheticProducer(config)(shard)`` samples the shard's images with the recipe's guidance and returns
its records (uint8 pixels at the real set's size and mode, which :func:`encoder` turns into ``output.codec``
bytes in the data plane's CPU stage; label, class name, seed, and
the real set's class names for the Parquet ClassLabel). The content is a function of (config, shard)
alone: the initial noise comes from a generator seeded by the shard's seed,
torch runs on a fixed number of threads, and the energies are built from the train split with seeds
derived from the run seed.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from factory.backbones import load_backbone, load_features
from factory.config import Config, EnergyConfig, from_dict
from factory.data import load_real, to_uint8
from factory.plan import Shard, shard_seed
from factory.shards import encode_images
from factory.sampler import Guidance, MixedCondition, sample


def build_backbone(cfg: Config, train, lora: str | None = None):
    """The configured backbone, producing images of the real set's size and mode, for its classes
    (``lora``: a Real-Fake adapter folder merged into its denoiser)."""
    options = dict(cfg.backbone.options)
    if lora:
        options["lora"] = lora
    if cfg.backbone.name != "tiny":
        options.setdefault("mode", train.mode)
        if cfg.backbone.name in ("sd15", "sd35m") or "class_ids" not in options:
            options.setdefault("class_names", list(train.class_names))
    return load_backbone(cfg.backbone.name, cfg.backbone.checkpoint, train.size, **options)


def build_features(cfg: Config):
    checkpoint = cfg.features.checkpoint if cfg.features.name == "cnn" else (cfg.features.checkpoint or None)
    return load_features(cfg.features.name, checkpoint, **cfg.features.options)


@torch.no_grad()
def embed(features, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([features(images[i: i + batch]) for i in range(0, len(images), batch)])


def sample_baseline(cfg: Config, recipe: str, backbone, features, classes: list[int]) -> torch.Tensor:
    """The synthetic side of the low-density discriminator: ``baseline_per_class`` samples of each of ``classes``
    with plain CFG at the recipe's scale, seeded per class, as features (len(classes) * per_class, D). Needs no
    reference bank, so the references stage samples it while it embeds the real set."""
    r = cfg.recipes[recipe]
    (e,) = [e for e in r.energies if e.name == "lowdensity"]
    per_class = e.params.baseline_per_class
    fakes = []
    for label in classes:
        g = torch.Generator().manual_seed(shard_seed(cfg.seed, f"{recipe}/baseline", label, 0))
        labels = torch.full((per_class,), label, dtype=torch.long)
        images = sample(backbone, backbone.scheduler, labels, g, cfg.sampling.steps, cfg_scale=r.cfg_scale,
                        eta=cfg.sampling.eta).images
        fakes.append(embed(features, images).float().cpu())
    return torch.cat(fakes)


def fit_discriminator(cfg: Config, recipe: str, fakes: torch.Tensor, classes: list[int], real_features):
    """Real-vs-synthetic feature discriminator for the low-density beta term (paper 001), trained once per recipe.

    Real side: ``real_features(label)`` of each of ``classes`` (at most ``bank.DISC_REAL_PER_CLASS`` each);
    synthetic side: ``fakes`` from :func:`sample_baseline`. ``classes`` is at most ``bank.DISC_MAX_CLASSES`` of
    the run's (``bank.discriminator_classes``), so the memory is bounded whatever the number of classes.
    Deterministic: a seeded CPU fit.
    """
    from factory import guidance
    from factory.bank import discriminator_real

    real = torch.cat([discriminator_real(real_features(label), cfg.seed, recipe, label) for label in classes])
    disc = guidance.FeatureDiscriminator(real.shape[1])
    return disc.fit(real, fakes, seed=cfg.seed)


class SyntheticProducer:
    """``adapters``: recipe -> the Real-Fake LoRA adapter (folder or URI) its shards sample with; a recipe
    with a ``finetune`` block needs one (``factory run`` fine-tunes first). Loaded lazily, per recipe.

    ``bank``: a run's output with its reference bank (the run's way): per class, the producer reads the
    features, OT targets and Gaussians the references stage fitted, and per recipe its discriminator; what it
    holds is the few classes it is making plus the class means table (C x D). Without a bank it stands alone:
    it loads and embeds the train split itself and fits the same things in memory (tests, benchmarks).
    """

    def __init__(self, config: dict | Config, adapters: dict[str, str] | None = None, bank: str | None = None,
                 storage_options: dict | None = None):
        from factory.bank import ClassImages, RealInfo, ReferenceBank

        self.cfg = config if isinstance(config, Config) else from_dict(config)
        self.adapters = dict(adapters or {})
        self._backbones: dict = {}
        torch.set_num_threads(self.cfg.executor.torch_threads)
        data = self.cfg.data
        self.bank = None if bank is None else ReferenceBank(bank, storage_options)
        if self.bank is not None:
            self.train, self.info = None, self.bank.info()
            self._class_images = ClassImages(data.source, data.root)
        else:
            self.train = load_real(data.source, "train", data.root)
            counts = np.bincount(self.train.labels, minlength=self.train.num_classes).tolist()
            self.info = RealInfo(list(self.train.class_names), self.train.size, self.train.mode, {"train": counts})
        self.backbone = build_backbone(self.cfg, self.info)
        self.features = build_features(self.cfg)
        self._train_features: torch.Tensor | None = None
        self._train_labels: torch.Tensor | None = None
        self._class_cache: dict[int, torch.Tensor] = {}
        self._gaussians: dict = {}  # "means" -> (labels, table); "precisions" -> (C, D, D)
        self._discriminators: dict = {}  # per recipe
        self._guidance: dict = {}  # the energies of the last few shards
        self._fitted_batch: dict[str, int] = {}  # sampling.batch_size auto, per recipe

    def backbone_for(self, recipe: str):
        """The backbone a recipe samples with: the base one, or the base with the recipe's LoRA merged."""
        path = self.adapters.get(recipe)
        if path is None:
            if self.cfg.recipes[recipe].finetune is not None:
                raise ValueError(f"recipe {recipe!r} fine-tunes the backbone (finetune): its adapter is needed "
                                 "(factory run makes it before sampling)")
            return self.backbone
        if recipe not in self._backbones:
            self._backbones[recipe] = build_backbone(self.cfg, self.info, lora=path)
        return self._backbones[recipe]

    @property
    def train_features(self) -> torch.Tensor:
        """Every train feature, embedded in this process: the standalone producer's (a bank's producer never)."""
        if self.bank is not None:
            raise RuntimeError("a producer reading a reference bank holds no whole train split")
        if self._train_features is None:
            self._train_features = embed(self.features, torch.from_numpy(self.train.to_float()))
            self._train_labels = torch.from_numpy(self.train.labels)
        return self._train_features

    @property
    def train_labels(self) -> torch.Tensor:
        self.train_features
        return self._train_labels

    def _class_features(self, label: int) -> torch.Tensor:
        if self.bank is None:
            return self.train_features[self.train_labels == label]
        if label not in self._class_cache:
            if len(self._class_cache) >= 4:  # an actor makes a few classes at a time: keep a few, not all
                self._class_cache.pop(next(iter(self._class_cache)))
            self._class_cache[label] = self.bank.features("train", label)
        return self._class_cache[label]

    def _class_pixels(self, label: int) -> torch.Tensor:
        """The class's real train images as float pixels in [-1, 1] (the latent prior's init images)."""
        if self.bank is None:
            return torch.from_numpy(self.train.to_float()[self.train.labels == label])
        from factory.bank import as_float

        return as_float(self._class_images("train", label))

    def _trained_classes(self) -> list[int]:
        if self.bank is not None:
            return [c for c in self.bank.meta()["labels"] if self.info.counts["train"][c]]
        return [c for c, n in enumerate(self.info.counts["train"]) if n]

    def _target(self, energy: str, recipe: str, size: int, label: int) -> dict:
        """The class's fitted target for a recipe's energy: the bank's, or fitted here standing alone."""
        from factory.bank import fit_target

        if self.bank is not None:
            return self.bank.target(energy, recipe, size, label)
        return fit_target(energy, self._class_features(label), size, self.cfg.seed, recipe, label)

    def _class_means(self) -> tuple[list[int], np.ndarray]:
        """(labels, means (C, D) float64): the table Eq. 4's contrast runs over (the bank's classes)."""
        if "means" not in self._gaussians:
            if self.bank is not None:
                self._gaussians["means"] = self.bank.class_means()
            else:
                have = self._trained_classes()
                means = [f.numpy().astype(np.float64).sum(0) / len(f) for f in map(self._class_features, have)]
                self._gaussians["means"] = (have, np.stack(means))
        return self._gaussians["means"]

    def _class_precisions(self) -> torch.Tensor:
        """(C, D, D) precisions of the means table's classes, with the metrics' ridge. C x D^2: the full
        covariance option only (the default identity precision needs none)."""
        from factory.bank import class_gaussian
        from factory.guidance.lowdensity import precision_from_covariance

        if "precisions" not in self._gaussians:
            labels, _ = self._class_means()
            if self.bank is not None:
                var, covs = self.bank.meta()["feature_var"], [self.bank.gaussian(c)[1] for c in labels]
            else:
                var = float(self.train_features.double().var(dim=0).mean())
                covs = [class_gaussian(self._class_features(c))[1] for c in labels]
            self._gaussians["precisions"] = torch.stack([precision_from_covariance(c, var) for c in covs]).float()
        return self._gaussians["precisions"]

    def _energy(self, e: EnergyConfig, recipe: str, shard: Shard):
        from factory import guidance

        if e.name == "chamfer":
            from factory.bank import target_kind

            target = self._target(target_kind(e), recipe, e.params.k, shard.label)
            refs = torch.from_numpy(target["references"])
            masses = None if "masses" not in target else torch.from_numpy(target["masses"])
            return guidance.ChamferEnergy(refs.to(self.backbone.device),  # where the sampler's features are
                                          masses=masses, **e.params.model_dump(exclude={"k", "references"}))
        if e.name == "ot":
            p = e.params.model_dump(exclude={"K"})
            target = self._target("ot", recipe, e.params.K, shard.label)
            n = self._images_per_class(recipe)
            # The class's target mass is partitioned across its shards (each fills its own share), so
            # shards stay independent, parallel and resumable while the class as a whole is matched.
            span = (shard.first_image / n, (shard.first_image + shard.num_images) / n)
            part = guidance.partition_masses(torch.from_numpy(target["masses"]), 1, 0, span=span)
            if p["cost_scale"] is None:  # the class's whole measure's, not this shard's part's
                p["cost_scale"] = float(target["cost_scale"])
            return guidance.OTEnergy(torch.from_numpy(target["support"]), part, **p)
        if e.name == "lowdensity":
            p = e.params.model_dump(exclude={"identity_precision", "baseline_per_class"})
            labels, means = self._class_means()
            if shard.label not in labels:
                raise ValueError(f"class {shard.label} has no train features: the low-density energy needs them")
            disc = self._discriminator(recipe) if e.params.beta > 0 else None
            return guidance.LowDensityEnergy(torch.from_numpy(means).float(),
                                             None if e.params.identity_precision else self._class_precisions(),
                                             label=labels.index(shard.label), discriminator=disc, **p)
        raise ValueError(f"unknown energy {e.name!r}")

    def _images_per_class(self, recipe: str) -> int:
        from factory.plan import images_per_class

        r = self.cfg.recipes[recipe]
        return images_per_class(r.scale, r.images_per_class, self.info.train_size(), self.info.num_classes)

    def _discriminator(self, recipe: str):
        """The recipe's discriminator: the bank's (trained once by the references stage), or, standing alone,
        trained here the same way (:func:`sample_baseline`, :func:`fit_discriminator`)."""
        from factory.bank import discriminator_classes

        if recipe not in self._discriminators:
            if self.bank is not None:
                disc = self.bank.discriminator(recipe)
            else:
                classes = discriminator_classes(self._trained_classes(), self.cfg.seed, recipe)
                fakes = sample_baseline(self.cfg, recipe, self.backbone_for(recipe), self.features, classes)
                disc = fit_discriminator(self.cfg, recipe, fakes, classes, self._class_features)
            self._discriminators[recipe] = disc.to(self.backbone.device).eval().requires_grad_(False)
        return self._discriminators[recipe]

    def guidance_for(self, shard: Shard) -> list[Guidance]:
        key = (shard.recipe, shard.label, shard.index)
        if key not in self._guidance:
            if len(self._guidance) >= 4:  # the last few shards' energies, not every shard's the actor made
                self._guidance.pop(next(iter(self._guidance)))
            self._guidance[key] = [
                Guidance(self._energy(e, shard.recipe, shard), e.weight, e.every, tuple(e.window), e.normalize,
                         e.name)
                for e in self.cfg.recipes[shard.recipe].energies
            ]
        return self._guidance[key]

    def _soft_label_condition(self, soft_labels, labels: torch.Tensor, generator: torch.Generator, backbone=None):
        """DMGD's dynamic soft labels: the conditioning of step i of n (paper 003, three stages)."""
        from factory import guidance

        backbone = backbone or self.backbone
        table = backbone.condition(torch.arange(backbone.num_classes))
        others = guidance.pick_other_class(labels, backbone.num_classes, generator)
        f_y, f_other = backbone.condition(labels), backbone.condition(others)
        std = guidance.embedding_noise_std(table)
        params = soft_labels.model_dump(exclude={"baseline", "mix"})
        base = backbone.null_condition(len(labels)) if soft_labels.baseline == "unconditional" else None

        def condition(i: int, n: int):
            # the paper's t counts down from T (noise) to 0: t_frac = 1 - i / n
            if soft_labels.mix == "embedding":
                return guidance.soft_label_embedding(1.0 - i / n, f_y, f_other, generator, noise_std=std,
                                                     baseline=base, **params)
            r, decayed = guidance.soft_label_parts(1.0 - i / n, f_y, f_other, generator, noise_std=std,
                                                   baseline=base, **params)
            if decayed is None:
                return f_y
            return decayed if r == 0.0 else MixedCondition((f_y, decayed), (r, 1.0 - r))

        return condition

    def batch_for(self, shard: Shard, backbone, guidance) -> int:
        """Images per sampling call: the recipe's progressive batch (part of the method), else
        ``sampling.batch_size``: an int, "auto" (the most that fit the actor's share of its GPU, probed once
        per recipe), or None (the whole shard)."""
        recipe = self.cfg.recipes[shard.recipe]
        size = self.cfg.sampling.batch_size
        if recipe.progressive_batch:
            return recipe.progressive_batch
        if size is None:
            return shard.num_images
        if size == "auto":
            if shard.recipe not in self._fitted_batch:
                self._fitted_batch[shard.recipe] = self._fit_batch(shard, backbone, guidance)
            size = self._fitted_batch[shard.recipe]
        return min(size, shard.num_images)

    def _fit_batch(self, shard: Shard, backbone, guidance, headroom: float = 0.85) -> int:
        """The largest batch whose peak memory fits ``headroom`` of the actor's share of its GPU: one guided
        step (every energy on) at batches 1 and 2 gives the per-image memory and the fixed part. On a CPU,
        the whole shard. A function of the device, the models and the recipe: same device, same batches."""
        device = getattr(backbone, "device", torch.device("cpu"))
        cap = self.cfg.sampling.shard_size
        if device.type != "cuda":
            return cap
        recipe = self.cfg.recipes[shard.recipe]
        probe = [dataclasses.replace(g, every=1, window=(0.0, 1.0)) for g in (guidance or [])]
        peaks = []
        for b in (1, 2):
            labels = torch.full((b,), shard.label, dtype=torch.long)
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            sample(backbone, backbone.scheduler, labels, torch.Generator().manual_seed(0), 1,
                   cfg_scale=recipe.cfg_scale, guidance=probe, features=self.features if probe else None,
                   condition=self._widest_condition(recipe, labels, backbone), grad_through=recipe.grad_through)
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device))
        share = min(1.0, self.cfg.executor.num_gpus) if self.cfg.executor.num_gpus > 0 else 1.0
        budget = torch.cuda.get_device_properties(device).total_memory * share * headroom
        per_image = max(peaks[1] - peaks[0], 1)
        fit = int((budget - (peaks[0] - per_image)) // per_image)
        fit -= fit % 8 if fit >= 8 else 0  # tensor-core friendly
        return max(1, min(fit, cap))

    @staticmethod
    def _widest_condition(recipe, labels: torch.Tensor, backbone):
        """The conditioning whose denoiser pass is the widest the recipe will run: soft labels mixed in the
        outputs batch two conditions with the unconditional one, so the memory probe must too."""
        if recipe.soft_labels is None or recipe.soft_labels.mix != "output":
            return None
        f = backbone.condition(labels)
        return lambda i, n: MixedCondition((f, f), (0.5, 0.5))

    def sample_shard(self, shard: Shard) -> torch.Tensor:
        recipe = self.cfg.recipes[shard.recipe]
        backbone = self.backbone_for(shard.recipe)
        generator = torch.Generator().manual_seed(shard.seed)
        aux = torch.Generator().manual_seed(shard.seed ^ 0x5F3759DF)  # soft labels, init images
        guidance = self.guidance_for(shard)
        step = self.batch_for(shard, backbone, guidance)
        init_pool = self._class_pixels(shard.label) if recipe.init_strength < 1.0 else None
        # candidates m > 1: m guided sets from the same generators in turn, then the shard's images are the
        # ones whose set the energy itself prefers (its ``select``); one draw otherwise
        images = torch.cat([self._sample_set(shard, recipe, backbone, guidance, generator, aux, step, init_pool)
                            for _ in range(recipe.candidates)])
        if not torch.isfinite(images).all():
            raise FloatingPointError(f"shard {shard.recipe}/{shard.name}: sampling produced NaN or Inf")
        if recipe.candidates > 1:
            chosen = guidance[0].energy.select(embed(self.features, images), shard.num_images)
            images = images[chosen.to(images.device)]
        return images

    def _sample_set(self, shard: Shard, recipe, backbone, guidance, generator, aux, step: int,
                    init_pool: torch.Tensor | None) -> torch.Tensor:
        """One guided set of the shard's size, in batches of ``step`` (init images drawn from ``init_pool``)."""
        images, frozen = [], None
        # Greedy progressive matching: each sub-batch is guided given the frozen samples before it.
        for start in range(0, shard.num_images, step):
            labels = torch.full((min(step, shard.num_images - start),), shard.label, dtype=torch.long)
            condition = None
            if recipe.soft_labels is not None:
                condition = self._soft_label_condition(recipe.soft_labels, labels, aux, backbone)
            init = None
            if init_pool is not None:
                init = init_pool[torch.randint(len(init_pool), (len(labels),), generator=aux)]
            result = sample(
                backbone, backbone.scheduler, labels, generator, self.cfg.sampling.steps,
                cfg_scale=recipe.cfg_scale, guidance=guidance, features=self.features if guidance else None,
                frozen=frozen, condition=condition, init_images=init, strength=recipe.init_strength,
                eta=self.cfg.sampling.eta, grad_through=recipe.grad_through, recurrence=recipe.recurrence,
            )
            images.append(result.images)
            if guidance and recipe.progressive_batch:
                with torch.no_grad():
                    f = self.features(result.images)
                frozen = f if frozen is None else torch.cat([frozen, f])
        return torch.cat(images)

    def __call__(self, shard: Shard) -> list[dict]:
        """The shard's records with uint8 pixels as ``image``: :func:`encoder` turns them into the output's
        codec in the data plane's CPU stage, off the accelerator."""
        from factory.bank import features_column

        images = self.sample_shard(shard)
        feats = features_column(images, self.features)  # in the evaluation space: scoring reads this column
        arrays = to_uint8(images)
        names = list(self.info.class_names)  # the Parquet ClassLabel's names: all of the real set's
        return [
            {"key": shard.key(i), "image": a, "label": shard.label,
             "class_name": shard.class_name, "seed": shard.seed, "class_names": names, "features": feats[i].tolist()}
            for i, a in enumerate(arrays)
        ]


def encoder(cfg: Config):
    """The data plane's ``finish`` for this config's records: pixels -> ``output.codec`` bytes (picklable)."""
    return functools.partial(encode_images, codec=cfg.output.codec, quality=cfg.output.quality)
