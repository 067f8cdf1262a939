"""report.html: one self-contained page per run, readable at a glance.

Sections, in order:

- **Metrics**: one row per recipe (and the real train split for reference), numbers rounded for reading, the best
  synthetic value of each column highlighted, and a legend of what each metric means and which way is better.
- **Plots** (matplotlib, Agg, inline PNGs):
  coverage against the Chamfer energy's ``k`` (when at least two recipes have a ``chamfer`` energy; unguided
  recipes, i.e. no energy, no soft labels and no image prior, are horizontal reference lines);
  downstream accuracy against the synthetic scale (images per class / real train images per class), one line per
  recipe family (recipes whose configs are equal once ``scale`` and ``images_per_class`` are removed) and training
  mode, with the real-only accuracy as a reference line (only when some family has at least two scales);
  per-image class-Gaussian hardness histograms per recipe, over the real test split's histogram.
- **Nearest neighbours**: per recipe, the synthetic images closest to the real train split in feature space
  (``metrics.memorisation``), next to their train neighbours, with distances.
- **Samples**: a grid per recipe, rows = classes (at most ``GRID_CLASSES`` classes, evenly spaced).
- **Provenance**: the run's facts (code revision, versions, seeds, wall times, shard counts) and its config.

The feature-space sections read each recipe's Parquet back and embed it with the run's evaluation features
(``features`` in the config); the class Gaussians are fitted on the real train split's features, as in
``factory.stages.score``. To stay cheap on large runs, at most ``MAX_IMAGES`` images per recipe (and of the real test
split) are read, a uniform sample without replacement drawn with a fixed seed from the planned images, so the same
run always gives the same page and at most ``MAX_IMAGES`` shard files are opened per recipe; the real train split is
likewise capped at ``MAX_TRAIN`` images (then the nearest-neighbour distances are upper bounds). At digits scale
everything is read. Images are embedded in batches and only thumbnails are kept, so memory stays bounded.

Everything is inline (data: URIs, CSS in the page): no external URL, no JavaScript. A section that cannot be made
(e.g. the feature checkpoint is gone) shows why instead of failing the run: the report is written last.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import logging
import math
import struct
import zlib

import numpy as np
from PIL import Image

from factory.data import decode_image
from factory.plan import Plan
from factory.shards import ShardSink

log = logging.getLogger(__name__)

MAX_IMAGES = 5000  # per recipe and of the real test split, read back for the feature-space sections
MAX_TRAIN = 50000  # real train images embedded for the class Gaussians and the nearest-neighbour search
NN_TOP = 4  # nearest-neighbour pairs shown per recipe
GRID_CLASSES = 20  # sample-grid rows at most
GRID_CELL, GRID_GAP = 36, 3  # sample-grid cell side and white gutter, in pixels
THUMB = 64  # side of the thumbnails in the nearest-neighbour section, in pixels
BATCH = 256  # images per embedding batch

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
    ("fd", "FD", "min",
     "Fréchet distance between Gaussians fitted to the real test and synthetic features (FID's formula in "
     "this feature space)."),
    ("hardness_mean", "hardness", "real",
     "Mean class-Gaussian hardness H = −log N(f; μ_y, Σ_y), Gaussians fitted on the real train split's "
     "features. Higher = rarer, harder samples; highlighted: closest to the real test split's mean."),
]
ARROWS = {"max": "↑", "min": "↓", "one": "→ 1", "real": "≈ real"}
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f"]


# ----------------------------------------------------------------------------------------------------------------
# images

def _png_data_uri(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fig_html(uri: str, alt: str, caption: str, cls: str = "") -> str:
    """A figure as wide as its PNG (read from the IHDR chunk), so the caption wraps under the image."""
    width = struct.unpack(">I", base64.b64decode(uri.split(",", 1)[1][:32])[16:20])[0]
    c = f' class="{cls}"' if cls else ""
    return (f'<figure{c} style="width:{width}px"><img alt="{html.escape(alt)}" src="{uri}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _fig_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(width: float, height: float):
    """A matplotlib Figure drawn by the Agg canvas, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _resize(im: Image.Image, side: int) -> Image.Image:
    """Scale so the longer side is ``side``: nearest-neighbour when enlarging (crisp pixels), Lanczos when shrinking."""
    w, h = im.size
    f = side / max(w, h)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return im.resize(size, Image.NEAREST if f >= 1 else Image.LANCZOS)


def _thumb(array: np.ndarray, side: int = THUMB) -> np.ndarray:
    """A uint8 RGB thumbnail whose longer side is at most ``side`` (images already that small are kept)."""
    im = Image.fromarray(array).convert("RGB")
    if max(im.size) > side:
        im = _resize(im, side)
    return np.asarray(im)


def _display(array: np.ndarray, side: int = THUMB) -> str:
    return _png_data_uri(np.asarray(_resize(Image.fromarray(array).convert("RGB"), side)))


def grid_labels(plan: Plan, max_classes: int = GRID_CLASSES) -> list[int]:
    """The classes shown in the sample grids: all, or ``max_classes`` evenly spaced ones."""
    if len(plan.labels) <= max_classes:
        return list(plan.labels)
    pos = np.linspace(0, len(plan.labels) - 1, max_classes).round().astype(int)
    return [plan.labels[i] for i in pos]


def sample_grid(sink: ShardSink, plan: Plan, recipe: str, per_class: int = 12, cell: int = 32,
                labels: list[int] | None = None, gap: int = 0) -> np.ndarray:
    """Rows = classes, columns = the first ``per_class`` images of the class's first shard, resized to ``cell``,
    each followed by a white gutter of ``gap`` pixels (right and below). Short rows are padded with white, to the
    longest row's length."""
    import pyarrow.parquet as pq

    rows = []
    for label in plan.labels if labels is None else labels:
        path = sink.path(recipe, "parquet", f"c{label:05d}-s00000")
        table = pq.read_table(path, filesystem=sink.fs, columns=["key", "image"]).slice(0, per_class)
        cells = []
        for key, data in zip(table.column("key").to_pylist(), table.column("image").to_pylist()):
            im = _resize(decode_image(data, f"{path}:{key}").convert("RGB"), cell)
            c = np.full((cell + gap, cell + gap, 3), 255, np.uint8)
            a = np.asarray(im)
            c[: a.shape[0], : a.shape[1]] = a
            cells.append(c)
        rows.append(cells)
    width = max(1, max(len(r) for r in rows))
    blank = np.full((cell + gap, cell + gap, 3), 255, np.uint8)
    grid = np.concatenate([np.concatenate(r + [blank] * (width - len(r)), axis=1) for r in rows], axis=0)
    return grid[: grid.shape[0] - gap, : grid.shape[1] - gap] if gap else grid


# ----------------------------------------------------------------------------------------------------------------
# reading back and embedding

def _subsample(n: int, cap: int, seed) -> np.ndarray:
    """Sorted indices of a uniform sample of ``min(n, cap)`` of ``range(n)`` without replacement; all when n <= cap."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


def _recipe_seed(plan: Plan, recipe: str) -> list[int]:
    return [plan.seed & (2**63 - 1), zlib.crc32(recipe.encode())]


def sample_rows(plan: Plan, recipe: str, cap: int = MAX_IMAGES) -> dict[tuple[int, int], np.ndarray]:
    """The planned images of ``recipe`` to read back: (label, shard index) -> sorted row numbers in that shard.

    A uniform sample of at most ``cap`` of the recipe's planned images, fixed by (run seed, recipe); computed from
    the plan's arithmetic alone (no listing), so it costs O(cap) whatever the run's size.
    """
    rp = next(r for r in plan.recipes if r.recipe == recipe)
    ipc = rp.images_per_class
    idx = _subsample(ipc * len(plan.labels), cap, _recipe_seed(plan, recipe))
    class_pos, within = np.divmod(idx, ipc)
    shard, row = np.divmod(within, rp.shard_size)
    out: dict[tuple[int, int], list[int]] = {}
    for c, s, r in zip(class_pos.tolist(), shard.tolist(), row.tolist()):
        out.setdefault((plan.labels[c], s), []).append(r)
    return {k: np.asarray(v) for k, v in out.items()}


def _to_float(images: np.ndarray):
    import torch

    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
    return x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)


def _embed_uint8(features, images: np.ndarray, batch: int = BATCH):
    import torch

    with torch.no_grad():
        out = [features(_to_float(images[i: i + batch])).float().cpu() for i in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0)


@dataclasses.dataclass
class RecipeSample:
    features: object  # torch (n, D) float32, CPU
    labels: np.ndarray  # (n,) int64
    thumbs: list  # uint8 RGB thumbnails, aligned with features
    missing_shards: int


def read_sample(sink: ShardSink, plan: Plan, recipe: str, features, mode: str, cap: int = MAX_IMAGES) -> RecipeSample:
    """Read ``sample_rows`` of ``recipe`` from its Parquet shards, embed them in batches, keep thumbnails.

    Images are converted to the real set's ``mode`` ("L" or "RGB") before embedding. Shards missing from the
    output are counted and skipped; rows beyond a shard's length are ignored.
    """
    import pyarrow.parquet as pq
    import torch

    feats, labels, thumbs, pending, missing = [], [], [], [], 0

    def flush():
        if pending:
            feats.append(_embed_uint8(features, np.stack(pending)))
            pending.clear()

    for (label, index), rows in sample_rows(plan, recipe, cap).items():
        path = sink.path(recipe, "parquet", f"c{label:05d}-s{index:05d}")
        try:
            table = pq.read_table(path, filesystem=sink.fs, columns=["key", "image", "label"])
        except FileNotFoundError:
            missing += 1
            continue
        rows = rows[rows < table.num_rows]
        table = table.take(rows)
        for key, data, y in zip(*(table.column(c).to_pylist() for c in ("key", "image", "label"))):
            a = np.asarray(decode_image(data, f"{path}:{key}").convert(mode))
            pending.append(a)
            labels.append(y)
            thumbs.append(_thumb(a))
            if len(pending) >= BATCH:
                flush()
    flush()
    f = torch.cat(feats) if feats else torch.zeros(0, 0)
    return RecipeSample(f, np.asarray(labels, dtype=np.int64), thumbs, missing)


@dataclasses.dataclass
class EvalSpace:
    """The real splits in the run's evaluation feature space, and the class Gaussians fitted on train."""

    features: object
    mode: str
    train_images: np.ndarray  # the (possibly capped) train images whose features are below
    train_labels: np.ndarray
    train_feats: object
    train_per_class: float  # images per class of the whole train split (the unit of ``scale``)
    test_hardness: np.ndarray
    gaussian: object
    train_capped: bool
    test_capped: bool


def eval_space(cfg, plan: Plan, max_train: int = MAX_TRAIN, max_test: int = MAX_IMAGES) -> EvalSpace:
    import torch

    from factory import metrics
    from factory.data import load_real
    from factory.generate import build_features

    train = load_real(cfg.data.source, "train", cfg.data.root)
    test = load_real(cfg.data.source, "test", cfg.data.root)
    features = build_features(cfg)
    ti = _subsample(len(train.labels), max_train, [plan.seed & (2**63 - 1), 1])
    train_images, train_labels = train.images[ti], train.labels[ti]
    train_feats = _embed_uint8(features, train_images)
    gaussian = metrics.ClassGaussian(train_feats, torch.from_numpy(train_labels), num_classes=train.num_classes)
    keep = np.flatnonzero(np.isin(test.labels, plan.labels))
    si = keep[_subsample(len(keep), max_test, [plan.seed & (2**63 - 1), 2])]
    test_feats = _embed_uint8(features, test.images[si])
    test_h = gaussian.hardness(test_feats.double(), torch.from_numpy(test.labels[si])).numpy()
    return EvalSpace(features, train.mode, train_images, train_labels, train_feats,
                     len(train.labels) / train.num_classes, test_h, gaussian,
                     len(ti) < len(train.labels), len(si) < len(keep))


# ----------------------------------------------------------------------------------------------------------------
# plots

def _colours(names: list[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def chamfer_k(recipe) -> int | None:
    """The ``k`` of the recipe's first Chamfer energy (the sampler's default 32 when unset), or None."""
    for e in recipe.energies:
        if e.name == "chamfer":
            return int(e.params.get("k", 32))
    return None


def unguided(recipe) -> bool:
    """Plain (classifier-free guided) sampling: no energy, no soft labels, no image prior."""
    return not recipe.energies and recipe.soft_labels is None and recipe.init_strength >= 1.0


def plot_coverage_vs_k(cfg, metrics: dict, colours: dict) -> str | None:
    """Coverage against the Chamfer ``k``; None when fewer than two recipes have a Chamfer energy."""
    pts = sorted((chamfer_k(r), name) for name, r in cfg.recipes.items()
                 if chamfer_k(r) is not None and "coverage" in metrics.get(name, {}))
    if len(pts) < 2:
        return None
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot()
    ks = [k for k, _ in pts]
    cov = [metrics[n]["coverage"] for _, n in pts]
    ax.plot(ks, cov, "-", color="#444", lw=1.2, zorder=1)
    for k, n in pts:
        ax.scatter([k], [metrics[n]["coverage"]], color=colours.get(n, "#444"), s=36, zorder=2, label=n)
    for name, r in cfg.recipes.items():
        if unguided(r) and "coverage" in metrics.get(name, {}):
            ax.axhline(metrics[name]["coverage"], color=colours.get(name, "#888"), ls="--", lw=1.2,
                       label=f"{name} (unguided)")
    if "coverage" in metrics.get("real", {}):
        ax.axhline(metrics["real"]["coverage"], color="#999", ls=":", lw=1.2, label="real train split")
    if max(ks) / max(min(ks), 1) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(ks)), [str(k) for k in sorted(set(ks))])
    ax.minorticks_off()
    ax.set_xlabel("Chamfer references per class k")
    ax.set_ylabel("coverage ↑")
    ax.set_title("Coverage against k", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", frameon=False)
    return _fig_data_uri(fig)


def recipe_families(cfg, names: list[str]) -> list[tuple[str, list[str]]]:
    """Groups of recipes whose configs are equal once ``scale`` and ``images_per_class`` are removed, in the order
    first seen; each named by the members' common name prefix (without trailing separators) or their first name."""
    groups: dict[str, list[str]] = {}
    for n in names:
        d = dataclasses.asdict(cfg.recipes[n])
        d.pop("scale", None)
        d.pop("images_per_class", None)
        groups.setdefault(json.dumps(d, sort_keys=True, default=str), []).append(n)
    out = []
    for members in groups.values():
        prefix = members[0]
        for m in members[1:]:
            while not m.startswith(prefix):
                prefix = prefix[:-1]
        prefix = prefix.rstrip("-_x ")
        out.append((prefix if len(members) > 1 and prefix else members[0], members))
    return out


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


def plot_accuracy_vs_scale(cfg, metrics: dict, scales: dict[str, float], colours: dict) -> str | None:
    """Downstream accuracy against scale, a line per (family, mode); None unless a family has two scales."""
    names = [n for n in cfg.recipes if metrics.get(n, {}).get("downstream") and n in scales]
    families = recipe_families(cfg, names)
    if not any(len({scales[m] for m in members}) >= 2 for _, members in families):
        return None
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot()
    styles = {"synthetic": ("-", "o"), "mixed": ("--", "s")}
    xs = []
    for fam, members in families:
        members = sorted(members, key=lambda m: scales[m])
        modes = sorted({mode for m in members for mode in metrics[m]["downstream"]})
        for mode in modes:
            pts = [(scales[m], metrics[m]["downstream"][mode]) for m in members if mode in metrics[m]["downstream"]]
            ls, marker = styles.get(mode, (":", "^"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=ls, marker=marker, color=colours.get(members[0]),
                    label=f"{fam} · {mode}", ms=5)
            xs += [p[0] for p in pts]
    real = metrics.get("real", {}).get("downstream", {}).get("real")
    if real is not None:
        ax.axhline(real, color="#999", ls=":", lw=1.2, label="real train split only")
    if max(xs) / min(xs) >= 4:
        ax.set_xscale("log", base=2)
    ticks = sorted(set(round(x, 3) for x in xs))
    ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("synthetic scale (images per class / real train per class)")
    ax.set_ylabel("real test accuracy ↑")
    ax.set_title("Downstream accuracy against scale", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", frameon=False)
    return _fig_data_uri(fig)


def plot_hardness(hardness: dict[str, np.ndarray], real: np.ndarray, colours: dict) -> str:
    """Per-recipe histograms of per-image hardness over the real test split's, on shared bins (the pooled 1–99
    percentile range; values outside it are counted in the end bins)."""
    pooled = np.concatenate([real] + list(hardness.values()))
    lo, hi = np.percentile(pooled, [1, 99])
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 41)
    n = len(hardness)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = _figure(3.7 * cols, 2.5 * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (name, h) in zip(axes.flat, hardness.items()):
        ax.hist(np.clip(real, lo, hi), bins=bins, density=True, color="#bbb", alpha=0.8, label="real test")
        ax.hist(np.clip(h, lo, hi), bins=bins, density=True, histtype="step", lw=1.8, color=colours.get(name),
                label=name)
        ax.axvline(real.mean(), color="#777", lw=1, ls=":")
        ax.axvline(h.mean(), color=colours.get(name), lw=1, ls="--")
        ax.set_title(f"{name}: mean {h.mean():.3g} (real {real.mean():.3g})", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.set_yticks([])
        ax.legend(fontsize=7, frameon=False, loc="upper right")
    for ax in axes[-1]:
        ax.set_xlabel("hardness H = −log N(f; μ_y, Σ_y)", fontsize=8)
    return _fig_data_uri(fig)


# ----------------------------------------------------------------------------------------------------------------
# HTML

def _num(v, key: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return html.escape(str(v))
    if isinstance(v, int):
        return f"{v:,}"
    if key in ("precision", "recall", "density", "coverage", "f1_pc"):
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


def metrics_table(metrics: dict, k: int | None = None) -> str:
    """The metrics table (real row last, set apart) and its legend."""
    k_nn = k  # the loops below reuse the name k for column keys
    names = [n for n in metrics if n != "real"] + (["real"] if "real" in metrics else [])
    modes = sorted({mode for m in metrics.values() for mode in (m.get("downstream") or {})},
                   key=lambda s: ({"synthetic": 0, "mixed": 1, "real": 2}.get(s, 3), s))
    cols = [(k, h, b) for k, h, b, _ in METRIC_COLUMNS] + [(f"downstream:{m}", f"accuracy · {m}", "max")
                                                          for m in modes]

    def value(name, key):
        if key.startswith("downstream:"):
            return (metrics[name].get("downstream") or {}).get(key.split(":", 1)[1])
        return metrics[name].get(key)

    real_h = next((m["real_hardness_mean"] for m in metrics.values() if "real_hardness_mean" in m), None)
    real_h_std = next((m["real_hardness_std"] for m in metrics.values() if "real_hardness_std" in m), None)
    synth = [n for n in names if n != "real"]
    best = {k: _best({n: value(n, k) for n in synth}, b, real_h) for k, _, b in cols}
    head = "<th>recipe</th>" + "".join(
        f'<th title="{html.escape(k)}">{html.escape(h).replace(" · ", "<br>")}'
        + (f'<span class="dir">{ARROWS[b]}</span>' if b else "") + "</th>" for k, h, b in cols)
    body = []
    for n in names:
        cells = []
        for k, _, _ in cols:
            v = value(n, k)
            text = f"{100 * v:.1f} %" if k.startswith("downstream:") and isinstance(v, (int, float)) else _num(v, k)
            cls = ' class="best"' if n in best[k] else ""
            cells.append(f"<td{cls}>{text}</td>")
        label = "real <small>(train split)</small>" if n == "real" else html.escape(n)
        row_cls = ' class="real"' if n == "real" else ""
        body.append(f"<tr{row_cls}><th scope=\"row\">{label}</th>{''.join(cells)}</tr>")
    legend = "".join(
        f"<dt>{html.escape(h)} <span class=\"dir\">{ARROWS[b] if b else ''}</span></dt><dd>{html.escape(d)}</dd>"
        for _, h, b, d in METRIC_COLUMNS)
    if modes:
        legend += ("<dt>accuracy · mode <span class=\"dir\">↑</span></dt><dd>Real test accuracy of a ResNet trained "
                   "on the set: <em>synthetic</em> = synthetic images only, <em>mixed</em> = synthetic + real train, "
                   "<em>real</em> = the real train split only (the reference).</dd>")
    kk = f"k = {k_nn}" if k_nn else "k"
    ref = ""
    if real_h is not None:
        ref = (f"<p class=\"note\">Real test split hardness: mean {_num(real_h)}"
               + (f", std {_num(real_h_std)}" if real_h_std is not None else "") + ".</p>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
            f"{ref}"
            f"<p class=\"note\">All metrics are computed against the real test split in the evaluation feature "
            f"space; the precision/recall/density/coverage neighbourhoods use {kk} nearest "
            f"neighbours (Naeem et al. "
            f"2020). <span class=\"best-key\">Highlighted</span>: the best synthetic recipe per column. The "
            f"<em>real</em> row is the real train split scored the same way, for reference.</p>"
            f"<dl class=\"legend\">{legend}</dl>")


def _grid_html(recipe: str, uri: str, labels: list[str], pitch: int, total_classes: int) -> str:
    rows = "".join(f'<div style="height:{pitch}px;line-height:{pitch - 2}px">{html.escape(c)}</div>' for c in labels)
    more = f" ({len(labels)} of {total_classes} classes)" if len(labels) < total_classes else ""
    return (f'<figure class="grid"><figcaption>{html.escape(recipe)}{more}</figcaption>'
            f'<div class="gridbody"><div class="rowlabels">{rows}</div>'
            f'<img alt="samples of {html.escape(recipe)}" src="{uri}"></div></figure>')


def nn_html(recipe: str, mem: dict, sample: RecipeSample, space: EvalSpace, class_names: list[str]) -> str:
    pairs = []
    for j, i, d in mem["closest"]:
        close = d <= mem["threshold"]
        y = int(sample.labels[j])
        ty = int(space.train_labels[i])
        cls = class_names[y] if 0 <= y < len(class_names) else str(y)
        tcls = class_names[ty] if 0 <= ty < len(class_names) else str(ty)
        same = cls if y == ty else f"{cls} / train {tcls}"
        pairs.append(
            f'<figure class="pair{" close" if close else ""}"><div>'
            f'<img alt="synthetic" src="{_display(sample.thumbs[j])}">'
            f'<img alt="train neighbour" src="{_display(space.train_images[i])}"></div>'
            f"<figcaption>d = {_num(d)}<br><small>class {html.escape(same)}</small></figcaption></figure>")
    stats = (f"nearest-train distance: min {_num(mem['nn_min'])}, median {_num(mem['nn_median'])} "
             f"(train–train median {_num(mem['train_nn_median'])}); "
             f"{100 * mem['frac_below_threshold']:.1f} % of the synthetic images are closer to train than "
             f"{_num(mem['threshold'])}, the {_ordinal(100 * mem['threshold_quantile'])} percentile of train–train "
             f"nearest-neighbour distances")
    flag = ' <span class="warn">possible copies</span>' if mem["frac_below_threshold"] > 0.05 else ""
    return (f'<div class="nn"><h3>{html.escape(recipe)}{flag}</h3><p class="note">{stats}.</p>'
            f'<div class="pairs">{"".join(pairs)}</div></div>')


def _kv_table(rows: list[tuple[str, object]], cls: str = "kv") -> str:
    return (f'<table class="{cls}">' + "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{v if isinstance(v, Markup) else html.escape(str(v))}</td></tr>"
        for k, v in rows) + "</table>")


class Markup(str):
    """A string already HTML."""


def provenance_html(provenance: dict, plan: Plan) -> str:
    import yaml

    cfg = provenance.get("config") or {}
    rev = provenance.get("code_revision")
    facts = [
        ("run", cfg.get("name", "")),
        ("output", provenance.get("output", "")),
        ("factory version", provenance.get("factory", "")),
        ("code revision", Markup(f"<code>{html.escape(str(rev))}</code>") if rev else "unknown (not a git checkout)"),
        ("python", provenance.get("python", "")),
        ("data", f"{cfg.get('data', {}).get('source', '')}"
                 + (f" ({cfg['data']['root']})" if cfg.get("data", {}).get("root") else "")
                 + f"; {len(plan.labels)} classes"),
        ("backbone", f"{cfg.get('backbone', {}).get('name', '')} · {cfg.get('backbone', {}).get('checkpoint', '')}"),
        ("features", f"{cfg.get('features', {}).get('name', '')} · {cfg.get('features', {}).get('checkpoint', '')}"),
        ("sampling", ", ".join(f"{k} {v}" for k, v in (cfg.get("sampling") or {}).items())),
        ("run seed", Markup(f"{plan.seed} <small>(shard seeds derive from it: sha256 of \"run seed/recipe/class/"
                            f"shard index\", 63 bits; each image's is in the Parquet <code>seed</code> column)"
                            f"</small>")),
    ]
    packages = provenance.get("packages") or {}
    wall = provenance.get("wall_seconds") or {}
    shards = provenance.get("shards") or {}
    side = []
    if packages:
        side.append("<h3>Packages</h3>" + _kv_table(sorted(packages.items())))
    if wall:
        wall = sorted(wall.items(), key=lambda kv: kv[0] == "total")  # total last
        side.append("<h3>Wall time</h3>" + _kv_table([(k, f"{v:,.1f} s" if isinstance(v, (int, float)) else v)
                                                        for k, v in wall]))
    if shards:
        side.append("<h3>Shards</h3>" + _kv_table([(k.replace("_", " "), v) for k, v in shards.items()]))
    recipe_rows = "".join(
        f"<tr><th scope=\"row\">{html.escape(r.recipe)}</th><td>{r.images_per_class:,}</td><td>{r.shard_size:,}</td>"
        f"<td>{r.shards_per_class:,}</td><td>{r.shards_per_class * len(plan.labels):,}</td>"
        f"<td>{r.images_per_class * len(plan.labels):,}</td></tr>" for r in plan.recipes)
    plan_table = ("<h3>Plan</h3><table class=\"plan\"><thead><tr><th>recipe</th><th>images / class</th>"
                  "<th>shard size</th><th>shards / class</th><th>shards</th><th>images</th></tr></thead>"
                  f"<tbody>{recipe_rows}</tbody></table>")
    config = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=100) if cfg else "(none)"
    raw = html.escape(json.dumps(provenance, indent=1, sort_keys=True, default=str))
    return (f'{_kv_table(facts, "kv facts")}<div class="prov"><div>{plan_table}</div>'
            + "".join(f"<div>{x}</div>" for x in side) + "</div>"
            f"<h3>Config</h3><pre>{html.escape(config)}</pre>"
            f"<details><summary>run.json</summary><pre>{raw}</pre></details>")


CSS = """
:root{--fg:#1d2330;--muted:#5b6473;--line:#dde1e7;--bg:#f6f7f9;--best:#dff3e4;--accent:#2b6cb0}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);
 margin:0;background:#fff}
main{max-width:1220px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:34px 0 10px;padding-bottom:4px;
 border-bottom:2px solid var(--line)}h3{font-size:14px;margin:16px 0 6px}
nav{font-size:13px;color:var(--muted);margin-bottom:8px}nav a{color:var(--accent);margin-right:12px;
 text-decoration:none}
.sub{color:var(--muted);margin:0 0 8px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
td,th{border-bottom:1px solid var(--line);padding:5px 10px;text-align:right;white-space:nowrap}
thead th{background:var(--bg);font-weight:600;border-bottom:2px solid var(--line);vertical-align:bottom}
tbody th,thead th:first-child{text-align:left}
td.best{background:var(--best);font-weight:700}
tr.real td,tr.real th{color:var(--muted);font-style:italic;border-top:2px solid var(--line)}
.dir{display:block;font-size:11px;color:var(--muted);font-weight:400}
.note{color:var(--muted);font-size:13px;margin:6px 0}
.best-key{background:var(--best);font-weight:700;padding:0 4px}
dl.legend{display:grid;grid-template-columns:max-content 1fr;gap:3px 14px;font-size:13px;margin:10px 0;
 background:var(--bg);padding:10px 14px;border-radius:6px}
dl.legend dt{font-weight:600}dl.legend dd{margin:0;color:var(--muted)}dl.legend .dir{display:inline}
.plots{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.plots figure{margin:0;max-width:100%}figure.wide{margin:18px 0 0;max-width:100%}
figure figcaption{font-size:13px;color:var(--muted)}
img{max-width:100%}
.grids{display:flex;flex-wrap:wrap;gap:22px}
figure.grid{margin:0}figure.grid figcaption{font-weight:600;color:var(--fg);margin-bottom:4px}
.gridbody{display:flex;align-items:flex-start}.gridbody img{max-width:none;image-rendering:pixelated}
.rowlabels{font-size:11px;color:var(--muted);padding-right:6px;text-align:right}
.nn{margin-bottom:10px}.nn h3{margin-bottom:0}
.pairs{display:flex;flex-wrap:wrap;gap:12px}
figure.pair{margin:0;padding:6px;border:1px solid var(--line);border-radius:6px;text-align:center}
figure.pair div{display:flex;gap:4px}figure.pair img{image-rendering:pixelated;width:64px;height:64px;
 object-fit:contain;background:#000}
figure.pair.close{border-color:#c53030;background:#fff5f5}
.warn{color:#c53030;font-size:12px;font-weight:600;margin-left:8px}
.error{color:#c53030}
.scroll{overflow-x:auto}
.prov{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start;margin-top:6px}
table.facts{min-width:640px}
table.kv th{text-align:left;color:var(--muted);font-weight:500}table.kv td{text-align:left;white-space:normal}
table.plan td,table.plan th{padding:4px 10px}
pre{background:var(--bg);padding:12px 14px;border-radius:6px;overflow:auto;font-size:12px;max-height:520px}
details summary{cursor:pointer;color:var(--accent);margin:10px 0}
"""


def render(metrics: dict, sections: dict[str, str], provenance: dict, title: str) -> str:
    """The page: a title line, a table of contents, then ``sections`` (id -> (heading, HTML)) in order."""
    nav = "".join(f'<a href="#{sid}">{html.escape(h)}</a>' for sid, (h, _) in sections.items())
    body = "".join(f'<section id="{sid}"><h2>{html.escape(h)}</h2>{content}</section>'
                   for sid, (h, content) in sections.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>factory report: {html.escape(title)}</title>
<style>{CSS}</style>
</head><body><main>
<h1>Synthetic data report: {html.escape(title)}</h1>
<p class="sub">{len([n for n in metrics if n != 'real'])} recipes ·
{sum(int(m.get('num_images', 0)) for n, m in metrics.items() if n != 'real'):,} synthetic images ·
code {html.escape(str(provenance.get('code_revision') or 'unknown')[:12])}</p>
<nav>{nav}</nav>
{body}
</main></body></html>
"""


def _safe(what: str, fn):
    """``fn()``'s HTML, or a note saying why this part of the report is missing (the run's data is all written)."""
    try:
        return fn()
    except Exception as e:  # the report is best effort: a missing part must not fail a finished run
        log.warning("report: %s not available", what, exc_info=True)
        return f'<p class="note error">{html.escape(what)} not available: {html.escape(type(e).__name__)}: ' \
               f'{html.escape(str(e))}</p>'


def write_report(sink: ShardSink, plan: Plan, metrics: dict, provenance: dict, max_images: int = MAX_IMAGES) -> str:
    """Write ``report.html`` at the run's root and return its path (see the module docstring for what it holds)."""
    from factory import metrics as M
    from factory.config import from_dict

    recipes = [r.recipe for r in plan.recipes]
    colours = _colours(recipes)
    state: dict = {}

    def setup():
        state["cfg"] = from_dict(provenance["config"])
        return ""

    problem = _safe("the run's config", setup)
    cfg = state.get("cfg")

    def feature_sections():
        if cfg is None:
            raise RuntimeError("no usable config in the provenance")
        space = eval_space(cfg, plan, max_test=max_images)
        samples = {r: read_sample(sink, plan, r, space.features, space.mode, max_images) for r in recipes}
        state["space"], state["samples"] = space, samples
        return ""

    feat_problem = _safe("the feature-space sections", feature_sections)
    space, samples = state.get("space"), state.get("samples", {})

    def plots():
        figs = []
        uri = plot_coverage_vs_k(cfg, metrics, colours) if cfg is not None else None
        if uri:
            figs.append(_fig_html(uri, "coverage against k", "Recipes with a Chamfer energy; dashed: unguided "
                                  "recipes; dotted: the real train split."))
        if cfg is not None:
            scales = recipe_scales(cfg, plan, space.train_per_class if space is not None else None)
            uri = plot_accuracy_vs_scale(cfg, metrics, scales, colours)
            if uri:
                figs.append(_fig_html(uri, "accuracy against scale", "One line per recipe family (configs equal but "
                                      "for the scale) and training mode; dotted: trained on the real train split "
                                      "only."))
        out = f'<div class="plots">{"".join(figs)}</div>' if figs else ""
        hard = {r: space.gaussian.hardness(s.features.double(), s.labels).numpy()
                for r, s in samples.items() if len(s.labels)} if space is not None else {}
        if hard:
            uri = plot_hardness(hard, space.test_hardness, colours)
            capped = [r for r, s in samples.items() if len(s.labels) < next(
                p.images_per_class for p in plan.recipes if p.recipe == r) * len(plan.labels)]
            note = (f" Per recipe (and of the real test split), a fixed uniform sample of at most {max_images:,} "
                    "images is read back"
                    + (f" (sampled here: {', '.join(capped)})" if capped else " (here: all images)") + ".")
            missing = {r: s.missing_shards for r, s in samples.items() if s.missing_shards}
            if missing:
                note += " Shards missing from the output, skipped: " + ", ".join(
                    f"{r} {n}" for r, n in missing.items()) + "."
            out += _fig_html(uri, "hardness histograms", "Per-image hardness of each recipe (line) over the real "
                             "test split's (grey), class Gaussians fitted on the real train features; dashed / "
                             "dotted: means; values outside the pooled 1st–99th percentile range are counted in the "
                             f"end bins.{note}", "wide")
        elif space is None:
            out += feat_problem
        return out or '<p class="note">No plot applies to this run.</p>'

    def neighbours():
        if space is None:
            return feat_problem
        names = list(plan.class_names)
        parts = []
        for r, s in samples.items():
            if len(s.labels) == 0:
                parts.append(f'<p class="note">{html.escape(r)}: no images read back.</p>')
                continue
            mem = M.memorisation(s.features, space.train_feats, top=NN_TOP, seed=plan.seed & (2**31 - 1))
            parts.append(nn_html(r, mem, s, space, names))
        cap = (f" The train split was capped at {MAX_TRAIN:,} images, so distances are upper bounds."
               if space.train_capped else "")
        return ('<p class="note">For each recipe, the synthetic images nearest to the real train split in feature '
                'space (left: synthetic, right: its nearest train image). Pairs framed in red are closer than the '
                f'1st percentile of train–train nearest-neighbour distances: likely near-copies.{cap}</p>'
                + "".join(parts))

    def grids():
        labels = grid_labels(plan)
        names = [plan.class_names[i] for i in labels]
        out = []
        for r in recipes:
            out.append(_safe(f"the sample grid of {r}", lambda r=r: _grid_html(
                r, _png_data_uri(sample_grid(sink, plan, r, cell=GRID_CELL, labels=labels, gap=GRID_GAP)), names,
                GRID_CELL + GRID_GAP, len(plan.labels))))
        return f'<div class="grids">{"".join(out)}</div>'

    sections = {
        "metrics": ("Metrics", _safe("the metrics table", lambda: metrics_table(metrics, cfg.eval.k if cfg else None))
                    + problem),
        "plots": ("Plots", _safe("the plots", plots)),
        "neighbours": ("Nearest train neighbours", _safe("the nearest-neighbour pairs", neighbours)),
        "samples": ("Samples", '<p class="note">The first images of each class\'s first shard; rows are classes.'
                               '</p>' + grids()),
        "provenance": ("Provenance", _safe("the provenance", lambda: provenance_html(provenance, plan))),
    }
    title = str((provenance.get("config") or {}).get("name", "run"))
    page = render(metrics, sections, provenance, title)
    path = f"{sink.root}/report.html"
    sink.put(path, page.encode())
    return path
