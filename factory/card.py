"""Dataset cards: ``<output>/<recipe>/README.md``, so a recipe folder is a Hugging Face dataset as it is.

The YAML header declares the features (``image``, ``label`` as a ClassLabel with the real set's class names,
as the Parquet files' ``huggingface`` metadata does) and ``configs`` -> ``data_files``, so
``datasets.load_dataset("<output>/<recipe>")`` loads the Parquet shards, and the folder can be pushed to a
hub as is. The body says how the set was made (config, seed, code revision, backbone, guidance, image
count and codec) and gives its metrics against the real test split. Written by ``factory run`` after
scoring; plain text from the run's config, plan, metrics and provenance (no ``datasets`` needed).
"""

from __future__ import annotations

import json

import yaml

from factory.config import Config
from factory.plan import Plan
from factory.shards import hf_features

METRICS = [("precision", "precision"), ("recall", "recall"), ("density", "density"), ("coverage", "coverage"),
           ("f1_pc", "F1(P,C)"), ("label_agreement", "label agreement"), ("fd", "FD"), ("hardness_mean", "hardness")]
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]


def size_category(n: int) -> str:
    return next((name for limit, name in SIZE_CATEGORIES if n < limit), "n>1T")


def yaml_features(features: dict) -> list | None:
    """``datasets`` features as ``Features.to_dict()`` writes them (the Parquet ``huggingface`` metadata) -> the
    card's ``dataset_info.features`` list, as ``datasets`` writes it; None for a type this does not know."""
    out = []
    for name, f in features.items():
        kind = f.get("_type")
        if kind == "Value":
            out.append({"name": name, "dtype": f["dtype"]})
        elif kind == "Image":
            out.append({"name": name, "dtype": "image"})
        elif kind == "ClassLabel":
            out.append({"name": name, "dtype": {"class_label": {"names": {str(i): str(n) for i, n in enumerate(f["names"])}}}})
        elif kind in ("List", "Sequence") and f.get("feature", {}).get("_type") == "Value":
            item = {"name": name, "list": f["feature"]["dtype"]}
            if f.get("length") not in (None, -1):
                item["length"] = f["length"]
            out.append(item)
        else:
            return None
    return out


def shard_features(sink, recipe: str) -> dict | None:
    """The ``datasets`` features a recipe's Parquet shards declare (their schema's ``huggingface`` metadata)."""
    import pyarrow.parquet as pq

    files = sink.shard_files(recipe, "parquet")
    if not files:
        return None
    with sink.fs.open(files[0], "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    if b"huggingface" not in meta:
        return None
    return json.loads(meta[b"huggingface"]).get("info", {}).get("features")


def card_header(cfg: Config, recipe: str, class_names: list[str], num_images: int | None,
                features: dict | None = None) -> dict:
    """The YAML header as a mapping: what ``huggingface_hub.DatasetCardData`` and ``datasets`` read.
    ``features``: the shards' own (:func:`shard_features`); by default the factory's columns."""
    header: dict = {
        "license": "other",
        "license_name": "inherits-model-and-data-licenses",
        "pretty_name": f"{cfg.name}: {recipe} (synthetic)",
        "task_categories": ["image-classification"],
        "tags": ["synthetic", "diffusion", "image-classification", "factory"],
    }
    if num_images is not None:
        header["size_categories"] = [size_category(num_images)]
    if "parquet" in cfg.output.formats:
        listed = yaml_features(features or hf_features(class_names))
        header["dataset_info"] = {} if listed is None else {"features": listed}
        if num_images is not None:
            header["dataset_info"]["splits"] = [{"name": "train", "num_examples": int(num_images)}]
        files = "parquet/*.parquet"
    else:  # WebDataset only: datasets' webdataset builder reads the tars, with its own features
        files = "webdataset/*.tar"
    header["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": files}]}]
    return header


def _num(x) -> str:
    if x is None:
        return "–"
    x = float(x)
    return f"{x:.3f}" if abs(x) < 10 else f"{x:,.1f}"


def _metrics_table(metrics: dict, recipe: str) -> list[str]:
    rows = [("real train split (reference)", metrics.get("real")), (recipe, metrics.get(recipe))]
    downstream = sorted({mode for _, m in rows if m for mode in m.get("downstream", {})})
    head = ["set", "images", *[label for _, label in METRICS], *[f"downstream acc. ({d})" for d in downstream]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows:
        if not m:
            continue
        cells = [name, f"{m.get('num_images', 0):,}", *[_num(m.get(k)) for k, _ in METRICS],
                 *[_num(m.get("downstream", {}).get(d)) for d in downstream]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def card_body(cfg: Config, recipe: str, plan: Plan, metrics: dict, prov: dict) -> str:
    r = cfg.recipes[recipe]
    m = metrics.get(recipe, {})
    rp = next(x for x in plan.recipes if x.recipe == recipe)
    classes = [plan.class_names[i] for i in plan.labels]
    guidance = [f"`{e.name}` (weight {e.weight:g}, every {e.every} step(s), window {list(e.window)}, normalize "
                f"{e.normalize}, {json.dumps(e.params.model_dump(), sort_keys=True)})" for e in r.energies]
    extras = []
    if r.soft_labels is not None:
        extras.append(f"DMGD soft labels {json.dumps(r.soft_labels.model_dump(), sort_keys=True)}")
    if r.progressive_batch:
        extras.append(f"greedy progressive matching in sub-batches of {r.progressive_batch}")
    if r.init_strength < 1.0:
        extras.append(f"latent prior: a real train image of the class noised to strength {r.init_strength:g}")
    if r.finetune is not None:
        extras.append(f"Real-Fake LoRA fine-tune of the denoiser (rank {r.finetune.rank}, MMD weight "
                      f"{r.finetune.mmd_weight:g}, {r.finetune.steps} steps; the adapter is in `lora/`)")
    codec = cfg.output.codec + ("" if cfg.output.codec == "png" else f", quality {cfg.output.quality}")
    rev = prov.get("code_revision") or "unknown (not a git checkout)"
    lines = [
        f"# {cfg.name} / {recipe}: a synthetic image classification set",
        "",
        f"Made by factory (version {prov.get('factory', '?')}, code revision `{rev}`): a "
        f"frozen diffusion model sampled each class, steered towards the real set `{cfg.data.source}` "
        f"by the guidance below. {m.get('num_images', rp.images_per_class * len(classes)):,} images, "
        f"{rp.images_per_class:,} per class for {len(classes)} classes, encoded as {codec}; labels are the real "
        "set's class ids and names.",
        "",
        "```python",
        "import datasets",
        f'ds = datasets.load_dataset("path/to/{recipe}", split="train")  # this folder, or its hub id',
        'ds[0]["image"], ds.features["label"].names[ds[0]["label"]]',
        "```",
        "",
        "## How it was made",
        "",
        f"- real set: `{cfg.data.source}`{f' at `{cfg.data.root}`' if cfg.data.root else ''}; classes: "
        + ", ".join(f"`{c}`" for c in classes),
        f"- backbone: `{cfg.backbone.name}` (`{cfg.backbone.checkpoint}`"
        + (f", options {json.dumps(cfg.backbone.options, sort_keys=True)}" if cfg.backbone.options else "") + ")",
        f"- feature space (guidance and metrics): `{cfg.features.name}` (`{cfg.features.checkpoint}`)",
        f"- sampling: {cfg.sampling.steps} steps, eta {cfg.sampling.eta:g}, CFG scale {r.cfg_scale:g}"
        + (" (CFG-free)" if r.cfg_scale == 1.0 else ""),
        "- guidance energies: " + ("; ".join(guidance) if guidance else "none (plain conditional sampling)"),
        *[f"- {x}" for x in extras],
        f"- seed: run seed {cfg.seed}; each shard's seed is a hash of (run seed, recipe, class, shard index), so "
        "the same config makes the same bytes",
        f"- shards: {rp.shards_per_class} per class of up to {rp.shard_size} images, as Parquet (`parquet/`)"
        + (" and WebDataset (`webdataset/`)" if "webdataset" in cfg.output.formats else "")
        + "; `_stats/` holds each shard's completion marker",
        *([f"- wall time of the run: {wall['total']:,.0f} s ({wall.get('sampling', 0):,.0f} s of sampling, all recipes)"]
          if (wall := prov.get("wall_seconds") or {}).get("total") is not None else []),
        "- the full config and package versions are in the run's `run.json`, beside this folder",
        "",
        "## Metrics",
        "",
        f"Against the real test split, in the feature space above, PRDC at k = {cfg.eval.k}; FD is the Fréchet "
        "distance of the features, hardness the mean class-Gaussian negative log-likelihood"
        + (f" (real test: {_num(m['real_hardness_mean'])} ± {_num(m.get('real_hardness_std'))})"
           if "real_hardness_mean" in m else "")
        + ("; downstream accuracy: a classifier trained on the set alone (`synthetic`), or with the real train "
           "split (`mixed`), on the real test split" if m.get("downstream") else "") + ".",
        "",
        *_metrics_table(metrics, recipe),
        "",
        "## License",
        "",
        "The images are outputs of the backbone above, conditioned on the real set: the licenses of both apply.",
        "",
    ]
    return "\n".join(lines)


def dataset_card(cfg: Config, recipe: str, plan: Plan, metrics: dict, prov: dict, features: dict | None = None) -> str:
    m = metrics.get(recipe, {})
    header = card_header(cfg, recipe, list(plan.class_names), m.get("num_images"), features)
    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n\n" + \
        card_body(cfg, recipe, plan, metrics, prov)


def write_cards(cfg: Config, sink, plan: Plan, metrics: dict, prov: dict) -> list[str]:
    """Write every recipe's ``README.md``; returns their paths."""
    paths = []
    for rp in plan.recipes:
        path = f"{sink.root}/{rp.recipe}/README.md"
        features = shard_features(sink, rp.recipe) if "parquet" in cfg.output.formats else None
        sink.put(path, dataset_card(cfg, rp.recipe, plan, metrics, prov, features).encode())
        paths.append(path)
    return paths
