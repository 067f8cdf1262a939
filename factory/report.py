"""report.html: one self-contained page per run, gathered from a bounded sample of the output.

The page (``templates/report.html.j2``) shows the metrics table, the plots (coverage against the Chamfer ``k``,
downstream accuracy against scale, hardness histograms), the synthetic images nearest to the real train split,
a sample grid per recipe and the run's provenance. This module gathers what it shows; ``factory.plots`` draws.

The report is written last, on the driver, so its memory and time must not grow with the run: per recipe it
reads the first row group(s) of the first shard of at most ``MAX_CLASSES`` classes (evenly spaced), at most
``ROWS_PER_CLASS`` rows of them, with their ``features`` column (nothing is embedded); the real side is the
reference bank's features of those classes (at most ``REAL_PER_CLASS`` train rows per class, seeded); real
images are read only for the few nearest-neighbour pairs shown. Shards without a ``features`` column (older
outputs) or an output without a bank get a note in place of the feature-space panels. A panel that cannot be
made says why instead of failing the finished run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
from PIL import Image

from factory import plots
from factory.data import decode_image
from factory.plan import Plan
from factory.shards import ShardSink
from factory.stages.tune import COLUMNS as TUNE_COLUMNS

log = logging.getLogger(__name__)

MAX_CLASSES = 10  # classes read back and shown, evenly spaced over the plan's
ROWS_PER_CLASS = 32  # synthetic rows read per (recipe, class), from the class's first shard
GRID_PER_CLASS = 12  # of which shown in the sample grid
REAL_PER_CLASS = 512  # real train features per class searched for nearest neighbours (a seeded subsample)
NN_TOP = 4  # nearest-neighbour pairs shown per recipe
GRID_CELL, GRID_GAP = 36, 3  # sample-grid cell side and white gutter, in pixels
THUMB = 64  # side of the nearest-neighbour thumbnails, in pixels

# (key, header, best, legend): best is "max", "min", "one" (closest to 1), "real" (closest to the real test
# split's mean hardness) or None (not ranked).
METRIC_COLUMNS = [
    ("num_images", "images", None, "Number of images in the set."),
    ("precision", "precision", "max",
     "Fidelity: fraction of synthetic images that fall inside the k-NN ball of some real test image."),
    ("recall", "recall", "max",
     "Diversity: fraction of real test images that fall inside the k-NN ball of some synthetic image."),
    ("density", "density", "one",
     "How many real k-NN balls hold each synthetic image, divided by k. About 1 for data like the real set; "
     "above 1 means crowding on dense modes, below 1 means off-manifold samples."),
    ("coverage", "coverage", "max",
     "Fraction of real test images whose k-NN ball holds at least one synthetic image (mode coverage, "
     "robust to outliers)."),
    ("f1_pc", "F1(P,C)", "max", "Harmonic mean of precision and coverage: one number for fidelity and coverage."),
    ("label_agreement", "label agreement", "max",
     "Fraction of synthetic images whose k nearest real test images mostly carry the image's own class "
     "(a k-NN vote): PRDC cannot see an image of the wrong class, a classifier trained on the set can."),
    ("fd", "FD", "min",
     "Fréchet distance between Gaussians fitted to the real test and synthetic features (FID's formula in "
     "this feature space)."),
    ("hardness_mean", "hardness", "real",
     "Mean class-Gaussian hardness H = −log N(f; μ_y, Σ_y), Gaussians fitted on the real train split's "
     "features. Higher = rarer, harder samples; highlighted: closest to the real test split's mean."),
]
OPTIONAL_KEYS = {"label_agreement"}
ARROWS = {"max": "↑", "min": "↓", "one": "→ 1", "real": "≈ real"}


# ----------------------------------------------------------------------------------------------------------------
# the bounded sample

def shown_classes(plan: Plan, max_classes: int = MAX_CLASSES) -> list[int]:
    """The classes read back and shown: all, or ``max_classes`` evenly spaced ones (the same for every run of
    the plan)."""
    if len(plan.labels) <= max_classes:
        return list(plan.labels)
    pos = np.linspace(0, len(plan.labels) - 1, max_classes).round().astype(int)
    return [plan.labels[i] for i in pos]


@dataclasses.dataclass
class ShardSample:
    """Rows of one recipe read back: encoded images, labels and (when the shards carry them) features."""

    keys: list[str]
    images: list[bytes]
    labels: np.ndarray  # (n,) int64
    features: np.ndarray | None  # (n, D) float32; None when a shard read has no features column
    rows_read: int  # rows Parquet decoded (whole row groups), >= len(labels)
    missing: list[str]  # shards absent from the output


def read_sample(sink: ShardSink, recipe: str, labels: list[int], rows: int = ROWS_PER_CLASS) -> ShardSample:
    """The first ``rows`` rows of each class's first shard, read row group by row group (only the groups needed,
    only the columns shown)."""
    import pyarrow.parquet as pq

    keys, images, ys, feats, missing, rows_read, has_features = [], [], [], [], [], 0, True
    for label in labels:
        path = sink.path(recipe, "parquet", f"c{label:05d}-s00000")
        try:
            fh = sink.fs.open(path, "rb")
        except FileNotFoundError:
            missing.append(path)
            continue
        with fh:
            pf = pq.ParquetFile(fh)
            has_features = has_features and "features" in pf.schema_arrow.names
            columns = ["key", "image", "label"] + (["features"] if has_features else [])
            taken = 0
            for group in range(pf.metadata.num_row_groups):
                if taken >= rows:
                    break
                table = pf.read_row_group(group, columns=columns)
                rows_read += table.num_rows
                table = table.slice(0, rows - taken)
                taken += table.num_rows
                keys += table.column("key").to_pylist()
                images += [im["bytes"] for im in table.column("image").to_pylist()]
                ys += table.column("label").to_pylist()
                if has_features:
                    col = table.column("features").combine_chunks()
                    feats.append(col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1))
    features = None
    if has_features:
        features = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    return ShardSample(keys, images, np.asarray(ys, dtype=np.int64), features, rows_read, missing)


@dataclasses.dataclass
class RealSample:
    """The reference bank's view of the shown classes: a train subsample for the neighbour search, the class
    Gaussians (fitted on each class's whole train features, as scoring fits them) and test hardness."""

    train: np.ndarray  # (m, D) float32
    train_rows: np.ndarray  # (m, 2) int64: (label, row within the class's train images, the bank's order)
    gaussians: dict  # label -> metrics.ClassGaussian
    test_hardness: np.ndarray
    capped: bool  # some class had more than the subsample's size
    train_per_class: float  # train images per class of the whole real set (the unit of a recipe's scale)

    def hardness(self, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
        import torch

        out = np.zeros(len(labels))
        for c in np.unique(labels).tolist():
            idx = labels == c
            out[idx] = self.gaussians[c].hardness(torch.from_numpy(features[idx]).double(), 0).numpy()
        return out


def read_real(bank, labels: list[int], per_class: int, seed: int) -> RealSample:
    """Bank features of ``labels`` only: one class's .npy at a time, at most ``per_class`` train rows kept."""
    import torch

    from factory import metrics

    meta = bank.meta()
    var = meta["feature_var"]
    train, rows, gaussians, test_h, capped = [], [], {}, [], False
    for c in labels:
        if meta["counts"]["train"][c] == 0:
            continue
        t = bank.features("train", c)
        if len(t) == 0:
            continue
        gaussians[c] = metrics.ClassGaussian(t, torch.zeros(len(t), dtype=torch.long), num_classes=1,
                                             feature_var=var)
        keep = np.arange(len(t))
        if len(t) > per_class:
            keep = np.sort(np.random.default_rng([seed, c]).choice(len(t), per_class, replace=False))
            capped = True
        train.append(t.numpy()[keep])
        rows.append(np.stack([np.full(len(keep), c), keep], 1))
        if meta["counts"]["test"][c]:
            test = bank.features("test", c)
            if len(test):
                test_h.append(gaussians[c].hardness(test.double(), 0).numpy())
    counts = meta["counts"]["train"]
    if not train:
        raise ValueError("the reference bank has no train features for the shown classes")
    return RealSample(np.concatenate(train), np.concatenate(rows).astype(np.int64), gaussians,
                      np.concatenate(test_h) if test_h else np.zeros(0), capped,
                      sum(counts) / max(1, len(counts)))


# ----------------------------------------------------------------------------------------------------------------
# what the page shows

def _num(v, key: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if key in ("precision", "recall", "density", "coverage", "f1_pc", "label_agreement"):
        return f"{v:.3f}"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1 or a == 0:
        return f"{v:.2f}"
    return f"{v:.3f}" if a >= 0.001 else f"{v:.2e}"


def _ordinal(x: float) -> str:
    if x != int(x):
        return f"{x:g}th"
    n = int(x)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _best(values: dict[str, float], how: str, target: float | None = None) -> set[str]:
    vals = {n: v for n, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if len(vals) < 2 or how is None:
        return set()
    if how == "one":
        score = {n: -abs(v - 1.0) for n, v in vals.items()}
    elif how == "real":
        if target is None:
            return set()
        score = {n: -abs(v - target) for n, v in vals.items()}
    elif how == "min":
        score = {n: -v for n, v in vals.items()}
    else:
        score = dict(vals)
    top = max(score.values())
    return {n for n, s in score.items() if s >= top - 1e-12 * max(1.0, abs(top))}


def metrics_view(metrics: dict, k: int | None = None) -> dict:
    """The metrics table's rows (real last), headers, best cells and legend."""
    names = [n for n in metrics if n != "real"] + (["real"] if "real" in metrics else [])
    modes = sorted({mode for m in metrics.values() for mode in (m.get("downstream") or {})},
                   key=lambda s: ({"synthetic": 0, "mixed": 1, "real": 2}.get(s, 3), s))
    # a metric no set has (label_agreement in a metrics.json written before it existed) gets no column
    shown = [c for c in METRIC_COLUMNS if c[0] not in OPTIONAL_KEYS or any(c[0] in m for m in metrics.values())]
    cols = [(key, h, b) for key, h, b, _ in shown] + [(f"downstream:{m}", f"accuracy · {m}", "max") for m in modes]

    def value(name, key):
        if key.startswith("downstream:"):
            return (metrics[name].get("downstream") or {}).get(key.split(":", 1)[1])
        return metrics[name].get(key)

    real_h = next((m["real_hardness_mean"] for m in metrics.values() if "real_hardness_mean" in m), None)
    real_h_std = next((m["real_hardness_std"] for m in metrics.values() if "real_hardness_std" in m), None)
    synth = [n for n in names if n != "real"]
    best = {key: _best({n: value(n, key) for n in synth}, b, real_h) for key, _, b in cols}
    rows = []
    for n in names:
        cells = []
        for key, _, _ in cols:
            v = value(n, key)
            text = f"{100 * v:.1f} %" if key.startswith("downstream:") and isinstance(v, (int, float)) else _num(v, key)
            std = (metrics[n].get("downstream_std") or {}).get(key.split(":", 1)[1]) if key.startswith("downstream:") else None
            if std is not None and isinstance(v, (int, float)):  # the mean over downstream.seeds
                text = f"{100 * v:.1f} ± {100 * std:.1f} %"
            cells.append({"text": text, "best": n in best[key]})
        rows.append({"name": n, "real": n == "real", "cells": cells})
    return {"headers": [{"key": key, "lines": h.split(" · "), "arrow": ARROWS[b] if b else ""} for key, h, b in cols],
            "rows": rows, "modes": modes, "k": k,
            "legend": [{"header": h, "arrow": ARROWS[b] if b else "", "text": d} for _, h, b, d in shown],
            "real_hardness": _num(real_h) if real_h is not None else None,
            "real_hardness_std": _num(real_h_std) if real_h_std is not None else None}


def recipe_scales(cfg, plan: Plan, train_per_class: float | None) -> dict[str, float]:
    """Synthetic scale of each recipe, images per class / real train images per class: the config's ``scale`` for
    a recipe sized by scale, else its ``images_per_class`` / ``train_per_class`` (left out when that is None)."""
    out = {}
    for r in plan.recipes:
        rc = cfg.recipes.get(r.recipe)
        if rc is not None and rc.images_per_class is None:
            out[r.recipe] = rc.scale
        elif train_per_class:
            out[r.recipe] = r.images_per_class / train_per_class
    return out


def _figure(uri: str, alt: str, caption: str, cls: str = "") -> dict:
    return {"uri": uri, "alt": alt, "caption": caption, "cls": cls, "width": plots.png_width(uri)}


def _class_name(names: list[str], y: int) -> str:
    return names[y] if 0 <= y < len(names) else str(y)


def neighbour_view(recipe: str, mem: dict, sample: ShardSample, real: RealSample, names: list[str]) -> dict:
    pairs = []
    for j, i, d in mem["closest"]:
        y, (ty, row) = int(sample.labels[j]), real.train_rows[i].tolist()
        cls = _class_name(names, y)
        pairs.append({"close": d <= mem["threshold"], "d": _num(d), "label": ty, "row": row,
                      "synthetic": plots.thumbnail_uri(decode_image(sample.images[j], sample.keys[j]), THUMB),
                      "classes": cls if y == ty else f"{cls} / train {_class_name(names, ty)}"})
    stats = (f"nearest-train distance: min {_num(mem['nn_min'])}, median {_num(mem['nn_median'])} "
             f"(train–train median {_num(mem['train_nn_median'])}); "
             f"{100 * mem['frac_below_threshold']:.1f} % of the synthetic images are closer to train than "
             f"{_num(mem['threshold'])}, the {_ordinal(100 * mem['threshold_quantile'])} percentile of train–train "
             f"nearest-neighbour distances")
    return {"recipe": recipe, "copies": mem["frac_below_threshold"] > 0.05, "stats": stats, "pairs": pairs}


def add_train_thumbnails(blocks: list[dict], class_images) -> None:
    """The real image of each pair: one read of each pair's class (``ClassImages``: a prepared Parquet set reads
    only the row groups that can hold the class), keeping only the thumbnails."""
    wanted: dict[int, list[dict]] = {}
    for b in blocks:
        for p in b["pairs"]:
            wanted.setdefault(p["label"], []).append(p)
    for label in sorted(wanted):
        images = class_images("train", label)
        for p in wanted[label]:
            p["train"] = plots.thumbnail_uri(Image.fromarray(images[p["row"]]), THUMB)
        del images


def provenance_view(provenance: dict, plan: Plan) -> dict:
    import yaml

    cfg = provenance.get("config") or {}
    data = cfg.get("data") or {}
    facts = [
        ("run", cfg.get("name", "")),
        ("output", provenance.get("output", "")),
        ("factory version", provenance.get("factory", "")),
        ("python", provenance.get("python", "")),
        ("data", f"{data.get('source', '')}" + (f" ({data['root']})" if data.get("root") else "")
         + f"; {len(plan.labels)} classes"),
        ("backbone", f"{cfg.get('backbone', {}).get('name', '')} · {cfg.get('backbone', {}).get('checkpoint', '')}"),
        ("features", f"{cfg.get('features', {}).get('name', '')} · {cfg.get('features', {}).get('checkpoint', '')}"),
        ("sampling", ", ".join(f"{k} {v}" for k, v in (cfg.get("sampling") or {}).items())),
    ]
    wall = sorted((provenance.get("wall_seconds") or {}).items(), key=lambda kv: kv[0] == "total")  # total last
    return {
        "facts": facts,
        "code_revision": provenance.get("code_revision"),
        "seed": plan.seed,
        "packages": sorted((provenance.get("packages") or {}).items()),
        "wall": [(k, f"{v:,.1f} s" if isinstance(v, (int, float)) else v) for k, v in wall],
        "shards": [(k.replace("_", " "), v) for k, v in (provenance.get("shards") or {}).items()],
        "plan": [{"recipe": r.recipe, "images_per_class": f"{r.images_per_class:,}", "shard_size": f"{r.shard_size:,}",
                  "shards_per_class": f"{r.shards_per_class:,}",
                  "shards": f"{r.shards_per_class * len(plan.labels):,}",
                  "images": f"{r.images_per_class * len(plan.labels):,}"} for r in plan.recipes],
        "config": yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=100) if cfg else "(none)",
        "raw": json.dumps(provenance, indent=1, sort_keys=True, default=str),
    }


def tuning_view(tuning: dict | None) -> list[dict]:
    """The tune stage's trial table per tuned recipe (run.json ``tuning``)."""
    out = []
    for recipe, t in (tuning or {}).items():
        headers = [k for k in (*TUNE_COLUMNS, "seconds") if any(k in row for row in t["trials"])]
        pilot = t["pilot"]
        out.append({"recipe": recipe, "param": t["param"], "chosen": t["chosen"], "written": t["written"],
                    "objective": t["objective"], "mode": t["mode"], "headers": headers, "warning": t.get("warning"),
                    "pilot": f"{len(pilot['classes'])} classes × {pilot['images_per_class']} images against "
                             f"{pilot['validation_per_class']} validation images per class",
                    "rows": [{"value": row["value"], "chosen": row["value"] == t["chosen"],
                              "cells": [_num(row[h], h) if h in row else "" for h in headers]}
                             for row in t["trials"]]})
    return out


class Part:
    """One panel of the page: what it shows, or why it is missing (the run's data is all written by now)."""

    def __init__(self, what: str, fn):
        self.value, self.error = None, None
        try:
            self.value = fn()
        except Exception as e:  # the report is best effort: a missing panel must not fail a finished run
            log.warning("report: %s not available", what, exc_info=True)
            self.error = f"{what} not available: {type(e).__name__}: {e}"


def render(context: dict) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("factory", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(**context)


def write_report(sink: ShardSink, plan: Plan, metrics: dict, provenance: dict, *, max_classes: int = MAX_CLASSES,
                 rows_per_class: int = ROWS_PER_CLASS, real_per_class: int = REAL_PER_CLASS,
                 storage_options: dict | None = None) -> str:
    """Write ``report.html`` at the run's root and return its path (see the module docstring for what it holds)."""
    from factory import metrics as M
    from factory.config import from_dict
    from factory.stages.references import ClassImages, ReferenceBank

    recipes = [r.recipe for r in plan.recipes]
    colours = plots.colours(recipes)
    names = list(plan.class_names)
    labels = shown_classes(plan, max_classes)
    seed = plan.seed & (2**63 - 1)
    cfg_part = Part("the run's config", lambda: from_dict(provenance["config"]))
    cfg = cfg_part.value
    sample = Part("the read-back sample", lambda: {r: read_sample(sink, r, labels, rows_per_class) for r in recipes})
    samples = sample.value or {}
    bank = ReferenceBank(sink.output, storage_options)
    real = Part("the reference bank", lambda: read_real(bank, labels, real_per_class, seed))
    no_features = [r for r, s in samples.items() if s.features is None]
    featured = {r: s for r, s in samples.items() if s.features is not None and len(s.labels)}
    feature_note = None
    if no_features:
        feature_note = (f"{', '.join(no_features)}: the shards have no features column (made before features "
                        "travelled with the shard), so the feature-space panels leave them out")

    def figures():
        out = []
        uri = plots.plot_coverage_vs_k(cfg, metrics, colours) if cfg is not None else None
        if uri:
            out.append(_figure(uri, "coverage against k", "Recipes with a Chamfer energy; dashed: unguided "
                               "recipes; dotted: the real train split."))
        if cfg is not None:
            scales = recipe_scales(cfg, plan, real.value.train_per_class if real.value else None)
            uri = plots.plot_accuracy_vs_scale(cfg, metrics, scales, colours)
            if uri:
                out.append(_figure(uri, "accuracy against scale", "One line per recipe family (configs equal but "
                                   "for the scale) and training mode; dotted: trained on the real train split only."))
        return out

    def hardness():
        if real.value is None or not featured or not len(real.value.test_hardness):
            return None
        h = {r: real.value.hardness(s.features, s.labels) for r, s in featured.items()}
        uri = plots.plot_hardness(h, real.value.test_hardness, colours)
        return _figure(uri, "hardness histograms", "Per-image hardness of each recipe (line) over the real test "
                       "split's (grey), class Gaussians fitted on the real train features; dashed / dotted: means; "
                       "values outside the pooled 1st–99th percentile range are counted in the end bins. "
                       f"{_sample_words(len(labels), len(plan.labels), rows_per_class)}", "wide")

    def neighbours():
        if real.value is None:
            raise RuntimeError(real.error)
        blocks = []
        for r, s in featured.items():
            mem = M.memorisation(s.features, real.value.train, top=NN_TOP, seed=plan.seed & (2**31 - 1))
            blocks.append(neighbour_view(r, mem, s, real.value, names))
        add_train_thumbnails(blocks, ClassImages(cfg.data.source, cfg.data.root))
        return blocks

    def grids():
        out = []
        for r, s in samples.items():
            rows = [[decode_image(im, key) for im, key, y in zip(s.images, s.keys, s.labels) if y == c]
                    [:GRID_PER_CLASS] for c in labels]
            out.append({"recipe": r, "uri": plots.png_data_uri(plots.image_grid(rows, GRID_CELL, GRID_GAP)),
                        "classes": [_class_name(names, c) for c in labels], "pitch": GRID_CELL + GRID_GAP})
        return out

    missing = {r: len(s.missing) for r, s in samples.items() if s.missing}
    context = {
        "title": str((provenance.get("config") or {}).get("name", "run")),
        "num_recipes": len([n for n in metrics if n != "real"]),
        "num_images": f"{sum(int(m.get('num_images', 0)) for n, m in metrics.items() if n != 'real'):,}",
        "code": str(provenance.get("code_revision") or "unknown")[:12],
        "config_error": cfg_part.error,
        "metrics": Part("the metrics table", lambda: metrics_view(metrics, cfg.eval.k if cfg else None)),
        "tuning": Part("the tuning table", lambda: tuning_view(provenance.get("tuning"))),
        "figures": Part("the plots", figures),
        "hardness": Part("the hardness histograms", hardness),
        "neighbours": Part("the nearest-neighbour pairs", neighbours),
        "neighbours_capped": real.value is not None and real.value.capped,
        "real_per_class": real_per_class,
        "grids": Part("the sample grids", grids), "sample_error": sample.error,
        "sample_words": _sample_words(len(labels), len(plan.labels), rows_per_class),
        "shown_classes": len(labels), "total_classes": len(plan.labels),
        "feature_note": feature_note, "bank_error": real.error,
        "missing": ", ".join(f"{r} {n}" for r, n in missing.items()),
        "provenance": Part("the provenance", lambda: provenance_view(provenance, plan)),
    }
    page = render(context)
    path = f"{sink.root}/report.html"
    sink.put(path, page.encode())
    return path


def _sample_words(shown: int, total: int, rows: int) -> str:
    classes = f"all {total} classes" if shown == total else f"{shown} of {total} classes, evenly spaced"
    return f"Read back: the first {rows} images of each recipe's first shard of {classes}."
