"""The references stage: the real train and test splits embedded once, class by class, and every per-class
statistic guidance needs fitted once, written as the reference bank (layout and reader: :mod:`factory.bank`).

Per class, in a Ray Data actor pool (GPUs when the config has them): its features, its Gaussian (mean and
covariance) and, for each recipe with an OT or Chamfer energy, its K-means measure or its k references. Then
one task gathers the class means table and the ridge scale, and one task per low-density recipe fits its
discriminator on a plain-CFG baseline, which another task samples while the real set is embedded. Sampling
actors load only the fitted targets of the classes they make, scoring reads the test features class by class,
and nothing re-embeds or refits after this stage. A rerun skips every file that exists;
a bank made for other data or another feature space is refused, not silently reused, and so is a discriminator
whose baseline would now be sampled differently.
"""

from __future__ import annotations

import io
import json

import numpy as np

from factory.bank import (BANK, SPLITS, ClassImages, RealInfo, ReferenceBank, as_float, class_gaussian,  # noqa: F401
                          discriminator_classes, fit_target, fitted_targets, lowdensity_recipes, real_info)


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class ClassEmbedder:
    """Ray Data callable class: loads the feature model once, then writes one (split, class) a row: its features
    and stats and, for train, its Gaussian and each recipe's OT and Chamfer targets (whichever are missing)."""

    def __init__(self, config: dict, output: str, storage_options: dict | None = None):
        import torch

        from factory.config import from_dict
        from factory.generate import build_features
        from factory.shards import ShardSink

        self.cfg = from_dict(config)
        torch.set_num_threads(self.cfg.executor.torch_threads)
        self.features = build_features(self.cfg)
        self.images = ClassImages(self.cfg.data.source, self.cfg.data.root)
        self.bank = ReferenceBank(output, storage_options)
        self.sink = ShardSink(output, [], storage_options)
        self.targets = fitted_targets(self.cfg)

    def _embed(self, split: str, label: int) -> np.ndarray:
        from factory.generate import embed

        images = self.images(split, label)
        if len(images):
            feats = embed(self.features, as_float(images)).float().cpu().numpy()
        else:
            feats = np.zeros((0, 0), dtype=np.float32)
        buf = io.BytesIO()
        np.save(buf, feats.astype(np.float32), allow_pickle=False)
        self.sink.put(self.bank.path(split, label, ".npy"), buf.getvalue())
        if split == "train" and len(feats):
            self.sink.put(self.bank.gauss_path(label), _npz(**dict(zip(("mean", "cov"), class_gaussian(feats)))))
        f64 = feats.astype(np.float64)
        stats = {"count": int(len(feats)), "sum": f64.sum(0).tolist(), "sumsq": (f64 ** 2).sum(0).tolist()}
        self.sink.put(self.bank.path(split, label, ".json"), json.dumps(stats).encode())  # marker, last
        return feats

    def __call__(self, batch: dict) -> dict:
        rows = {"split": [], "label": [], "count": []}
        for split, label in zip(batch["split"], batch["label"]):
            split, label = str(split), int(label)
            fs = self.bank.fs
            feats = None if fs.exists(self.bank.path(split, label, ".json")) else self._embed(split, label)
            if split == "train":
                def train_feats():
                    return self.bank.features("train", label).numpy() if feats is None else feats

                if feats is None and not fs.exists(self.bank.gauss_path(label)):  # a bank from before Gaussians
                    feats = train_feats()
                    self.sink.put(self.bank.gauss_path(label), _npz(**dict(zip(("mean", "cov"),
                                                                                 class_gaussian(feats)))))
                for energy, recipe, size in self.targets:
                    path = self.bank.target_path(energy, recipe, size, label)
                    if not fs.exists(path):
                        feats = train_feats()
                        self.sink.put(path, _npz(**fit_target(energy, feats, size, self.cfg.seed, recipe, label)))
            rows["split"].append(split)
            rows["label"].append(label)
            rows["count"].append(-1 if feats is None else len(feats))
        return {k: np.asarray(v) for k, v in rows.items()}


def bank_signature(cfg) -> dict:
    """What the bank's content depends on: the real data and the feature space."""
    return {"data": {"source": cfg.data.source, "root": cfg.data.root}, "features": cfg.features.model_dump()}


def summarise_bank(output: str, storage_options: dict | None, labels: list[int]) -> dict:
    """A task: the class means table (``means.npz``) and the ridge scale of every class Gaussian (the mean
    per-dimension variance of all train features), from the classes' stats files read one at a time."""
    from factory.shards import ShardSink

    bank = ReferenceBank(output, storage_options)
    names = bank.listing("train")
    n, s1, s2, have, means = 0, None, None, [], []
    for c in sorted(labels):
        if f"c{c:05d}.json" not in names:
            continue
        st = bank.stats("train", c)
        if not st["count"]:
            continue
        n += st["count"]
        a, b = np.asarray(st["sum"]), np.asarray(st["sumsq"])
        s1, s2 = (a, b) if s1 is None else (s1 + a, s2 + b)
        have.append(c)
        means.append(a / st["count"])
    dim = 0 if s1 is None else int(len(s1))
    var = float(((s2 - s1 ** 2 / n) / max(n - 1, 1)).mean()) if n > 1 else 0.0
    table = np.stack(means) if means else np.zeros((0, dim))
    ShardSink(output, [], storage_options).put(bank.means_path, _npz(labels=np.asarray(have, dtype=np.int64),
                                                                        means=table.astype(np.float64)))
    return {"dim": dim, "feature_var": var, "train_images": n}


def discriminator_made_for(cfg, recipe: str, adapter: str | None) -> dict:
    """What a recipe's discriminator depends on besides the bank: its baseline's sampling (CFG scale, images per
    class, seed, backbone and adapter, steps, eta); not the recipe's image count or energy weights."""
    r = cfg.recipes[recipe]
    (e,) = [e for e in r.energies if e.name == "lowdensity"]
    per_class = e.params.baseline_per_class
    return json.loads(json.dumps({"cfg_scale": r.cfg_scale, "baseline_per_class": per_class, "seed": cfg.seed,
                                  "backbone": cfg.backbone.model_dump(), "adapter": adapter,
                                  "steps": cfg.sampling.steps, "eta": cfg.sampling.eta}))


def baseline_task(config: dict, recipe: str, adapter: str | None, info: RealInfo, classes: list[int]):
    """A task: the recipe's plain-CFG baseline features (:func:`factory.generate.sample_baseline`); it reads no
    bank, so it runs while the bank is being embedded."""
    import torch

    from factory.config import from_dict
    from factory.generate import build_backbone, build_features, sample_baseline

    cfg = from_dict(config)
    torch.set_num_threads(cfg.executor.torch_threads)
    return sample_baseline(cfg, recipe, build_backbone(cfg, info, lora=adapter), build_features(cfg), classes)


def discriminator_task(config: dict, output: str, recipe: str, adapter: str | None, classes: list[int], fakes,
                       storage_options: dict | None = None) -> dict:
    """A task: the recipe's low-density discriminator, fitted on the bank's train features against its
    baseline ``fakes`` (see :func:`factory.generate.fit_discriminator` for its bounded size), then written."""
    import torch

    from factory.config import from_dict
    from factory.generate import fit_discriminator
    from factory.shards import ShardSink

    cfg = from_dict(config)
    torch.set_num_threads(cfg.executor.torch_threads)
    bank = ReferenceBank(output, storage_options)
    disc = fit_discriminator(cfg, recipe, fakes, classes, lambda c: bank.features("train", c))
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in disc.state_dict().items()}, buf)
    sink = ShardSink(output, [], storage_options)
    sink.put(bank.discriminator_path(recipe), buf.getvalue())
    done = {"made_for": discriminator_made_for(cfg, recipe, adapter), "in_dim": disc.in_dim,
            "hidden": list(disc.hidden), "classes": classes, "last_loss": disc.last_loss}
    sink.put(bank.discriminator_path(recipe, "done.json"), json.dumps(done, indent=1).encode())  # marker, last
    return done


def start_discriminators(cfg, output: str, info: RealInfo, labels: list[int], adapters: dict[str, str] | None = None,
                         storage_options: dict | None = None) -> list[tuple]:
    """Start, in parallel Ray tasks, the baseline sampling of every low-density recipe that has no discriminator
    yet and can sample now (no ``finetune``, or its adapter in ``adapters``); ``labels`` are the bank's classes.
    Returns what :func:`finish_discriminators` fits; a discriminator made for another baseline is refused."""
    import ray

    bank = ReferenceBank(output, storage_options)
    adapters = adapters or {}
    started = []
    ex = cfg.executor
    task = ray.remote(num_cpus=ex.num_cpus, num_gpus=ex.num_gpus)(baseline_task)
    for recipe in lowdensity_recipes(cfg):
        if cfg.recipes[recipe].finetune is not None and recipe not in adapters:
            continue  # sampled with its LoRA adapter: trained once that exists (call again after fine-tuning)
        adapter = adapters.get(recipe)
        if bank.has_discriminator(recipe):
            done = json.loads(bank.fs.cat_file(bank.discriminator_path(recipe, "done.json")))
            want = discriminator_made_for(cfg, recipe, adapter)
            if done["made_for"] != want:
                raise ValueError(f"{output}/{BANK}/lowdensity/{recipe} holds a discriminator made for "
                                 f"{done['made_for']}, not this run's {want}: use another --output, or delete that "
                                 "folder to retrain it")
            continue
        classes = discriminator_classes([c for c in labels if info.counts["train"][c]], cfg.seed, recipe)
        started.append((recipe, adapter, classes, task.remote(cfg.to_dict(), recipe, adapter, info, classes)))
    return started


def finish_discriminators(cfg, output: str, started: list[tuple], storage_options: dict | None = None) -> list[str]:
    """Fit and write the discriminators :func:`start_discriminators` started (the bank's train features must be
    complete). Returns the recipes trained."""
    import ray

    ex = cfg.executor
    task = ray.remote(num_cpus=ex.num_cpus)(discriminator_task)
    ray.get([task.remote(cfg.to_dict(), output, recipe, adapter, classes, fakes, storage_options)
             for recipe, adapter, classes, fakes in started])
    return [recipe for recipe, *_ in started]


def train_discriminators(cfg, output: str, adapters: dict[str, str] | None = None,
                         storage_options: dict | None = None) -> list[str]:
    """Train the discriminator of every low-density recipe that has none yet and can sample now, on a complete
    bank. Returns the recipes trained."""
    bank = ReferenceBank(output, storage_options)
    started = start_discriminators(cfg, output, bank.info(), bank.meta()["labels"], adapters, storage_options)
    return finish_discriminators(cfg, output, started, storage_options)


def build_reference_bank(cfg, output: str, info: RealInfo, labels: list[int], storage_options: dict | None = None,
                         progress: bool = True, adapters: dict[str, str] | None = None) -> dict:
    """The references stage: embed and fit ``labels``' classes once, one (split, class) per actor call, then
    the means table and the discriminators (``adapters``: recipe -> LoRA adapter, for fine-tuned recipes).

    Returns the bank's meta.json content. The driver holds one small row per class, nothing that grows with
    images or dimensions.
    """
    import ray
    from tqdm import tqdm

    from factory.shards import ShardSink

    bank = ReferenceBank(output, storage_options)
    signature = bank_signature(cfg)
    meta = None
    if bank.is_complete():
        meta = bank.meta()
        if meta.get("signature") != json.loads(json.dumps(signature)):
            raise ValueError(f"{output}/{BANK} was made for {meta.get('signature')}, not this run's data and features "
                             f"({signature}): use another --output, or delete {BANK}/ to rebuild it")
        if not set(labels) <= set(meta["labels"]):
            meta = None
    names = {split: bank.listing(split) for split in SPLITS}
    targets = [bank.listing(bank.target_folder(*t)) for t in fitted_targets(cfg)]

    def pending(split: str, c: int) -> bool:
        if f"c{c:05d}.json" not in names[split]:
            return True
        return split == "train" and (f"c{c:05d}.gauss.npz" not in names[split]
                                     or any(f"c{c:05d}.npz" not in have for have in targets))

    items = [{"split": s, "label": int(c)} for s in SPLITS for c in labels if info.counts[s][c] > 0 and pending(s, c)]
    # the discriminators' baselines need no bank: sampled while the real set is embedded
    discriminators = start_discriminators(cfg, output, info, meta["labels"] if meta else sorted(set(labels)),
                                          adapters, storage_options)
    if items:
        ex = cfg.executor
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 200)).map_batches(
            ClassEmbedder, fn_constructor_kwargs=dict(config=cfg.to_dict(), output=output,
                                                      storage_options=storage_options),
            batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, ex.num_actors[1])),
            num_cpus=ex.num_cpus, num_gpus=ex.num_gpus)
        with tqdm(total=len(items), desc="references", unit="class", disable=not progress) as bar:
            for _ in ds.iter_rows():
                bar.update(1)
    if meta is None or any(it["split"] == "train" and f"c{it['label']:05d}.json" not in names["train"]
                           for it in items):
        summary = ray.get(ray.remote(num_cpus=1)(summarise_bank).remote(output, storage_options, sorted(set(labels))))
        meta = {"signature": signature, "class_names": info.class_names, "size": list(info.size), "mode": info.mode,
                "counts": info.counts, "labels": sorted(set(labels)), **summary}
        ShardSink(output, [], storage_options).put(bank.meta_path, json.dumps(meta, indent=1).encode())
    finish_discriminators(cfg, output, discriminators, storage_options)
    return meta
