"""``factory run CONFIG --rehearse``: a job at its full shape on the machine at hand, before its GPU-hours.

Everything the job names stays (classes, recipes, energies and their params, the shard plan, the stages);
what cannot run here is swapped: the backbone and the feature space for tiny random-weight models of the
same kinds (the configs ``factory bench --size tiny`` builds, saved as folders and loaded by the real
``from_pretrained`` path), the real set for a generated one with the job's classes in the factory's
Parquet layout (``--rehearse-size`` px, RGB for the latent backbones), and the executor for this machine's
CPUs. ``--set`` still applies, so ``--set recipes.chamfer.images_per_class=100 --set sampling.steps=2``
rehearses a 100-per-class run. Jobs on the embedded tiny backbone rehearse as themselves.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

TRAIN_PER_CLASS = 8  # generated references per class (a job's declared train size per class, up to 32)
TEST_PER_CLASS = 8  # test images per class: enough for per-class PRDC at k = 5


def class_names_of(cfg) -> list[str]:
    """The job's classes: ``data.classes``, else ``data.num_classes`` ImageNet-like ids."""
    if cfg.data.classes:
        return list(cfg.data.classes)
    if cfg.data.num_classes:
        return [f"n{i:08d}" for i in range(cfg.data.num_classes)]
    raise ValueError("--rehearse needs the job's classes: data.classes or data.num_classes")


def write_real_set(root: str, class_names: list[str], size: int, mode: str, train_per_class: int,
                   test_per_class: int, seed: int = 0) -> None:
    """A generated real set, one Parquet file per class and split, and its classes.json: each class a colour
    field with its own mean, so classes differ as real ones do. Written class by class (memory: one class)."""
    from PIL import Image

    from factory.shards import ShardSink, encode_parquet

    sink = ShardSink(root, [])
    counts = {"train": [train_per_class] * len(class_names), "test": [test_per_class] * len(class_names)}
    for label, name in enumerate(class_names):
        rng = np.random.default_rng([seed, label])
        base = rng.integers(0, 256, size=3)
        for split, n in (("train", train_per_class), ("test", test_per_class)):
            records = []
            for i in range(n):
                img = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
                pil = Image.fromarray(img, "RGB").convert(mode)
                from io import BytesIO

                buf = BytesIO()
                pil.save(buf, format="PNG")
                records.append({"key": f"{split}_{label:05d}_{i:04d}", "image": buf.getvalue(), "label": label,
                                "class_name": name, "seed": -1})
            sink.put(f"{sink.root}/{split}/c{label:05d}.parquet", encode_parquet(records, class_names))
    index = {"class_names": class_names, "size": [size, size], "mode": mode, "counts": counts}
    sink.put(f"{sink.root}/classes.json", json.dumps(index).encode())


def save_tiny_models(backbone: str, features: str, root: str, seed: int = 0, size: str = "tiny") -> dict:
    """Random-weight models of the job's kinds (``size`` "tiny", or "full" for the device benchmark),
    saved as folders: {"backbone": path, "features": path}."""
    from factory.random_models import build_components, build_features_model, save_pipeline

    out = {}
    if backbone != "tiny":
        comps = build_components(backbone, size, seed=seed)
        save_pipeline(comps, os.path.join(root, backbone))
        out["backbone"] = os.path.join(root, backbone)
    if features != "cnn":
        model, size = build_features_model(features, size, seed=seed + 1)
        where = os.path.join(root, features)
        model.save_pretrained(where)
        with open(os.path.join(where, "preprocessor_config.json"), "w") as f:
            json.dump({"crop_size": {"height": size, "width": size}}, f)
        out["features"] = where
    return out


def rehearsal_overrides(cfg, output: str, size: int = 32) -> list[str]:
    """The ``--set`` overrides that turn ``cfg`` into its rehearsal (models and data made under ``output``'s
    ``_rehearsal/`` when it is local, else in a temporary folder)."""
    sets = ["executor.num_gpus=0", "executor.num_cpus=1", "executor.torch_threads=1",
            f"executor.num_actors=[1,{max(1, min(2, os.cpu_count() or 1))}]", "executor.address=null"]
    if cfg.backbone.name == "tiny":
        return sets
    local = "://" not in output or output.startswith("file://")
    work = os.path.join(output.replace("file://", ""), "_rehearsal") if local else tempfile.mkdtemp(prefix="rehearsal-")
    names = class_names_of(cfg)
    mode = "RGB"
    data_root = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data_root, "classes.json")):
        per_class = TRAIN_PER_CLASS
        if cfg.data.train_size and cfg.data.num_classes:
            per_class = max(2, min(32, cfg.data.train_size // cfg.data.num_classes))
        write_real_set(data_root, names, size, mode, per_class, TEST_PER_CLASS, seed=cfg.seed)
    models = save_tiny_models(cfg.backbone.name, cfg.features.name, os.path.join(work, "models"), seed=cfg.seed)
    sets += ["data.source=parquet", f"data.root={data_root}", f"data.image_size={size}",
             f"backbone.checkpoint={models['backbone']}", "backbone.options.dtype=fp32"]
    if cfg.data.num_classes:
        sets.append(f"data.num_classes={len(names)}")
    if cfg.backbone.options.get("guidance_decoder") == "tiny":
        sets.append(f"backbone.options.tiny_vae={os.path.join(models['backbone'], 'tiny_vae')}")
    for key in ("lora",):
        if key in cfg.backbone.options:
            sets.append(f"backbone.options.{key}=null")
    if "features" in models:
        sets += [f"features.checkpoint={models['features']}", "features.options.dtype=fp32"]
    return sets
