"""The report's figures: matplotlib (Agg, no pyplot state) and PIL image grids, each returned as a PNG data URI
so the page stays one self-contained file. Same inputs give the same bytes (no timestamps in the PNGs)."""

from __future__ import annotations

import base64
import io
import json
import math
import struct

import numpy as np
from PIL import Image

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f"]


def colours(names: list[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def png_data_uri(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def png_width(uri: str) -> int:
    """Width of a PNG data URI, from its IHDR chunk: a figure is laid out as wide as its image."""
    return struct.unpack(">I", base64.b64decode(uri.split(",", 1)[1][:32])[16:20])[0]


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


# ----------------------------------------------------------------------------------------------------------------
# images

def resize(im: Image.Image, side: int) -> Image.Image:
    """Scale so the longer side is ``side``: nearest-neighbour when enlarging (crisp pixels), Lanczos when shrinking."""
    w, h = im.size
    f = side / max(w, h)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return im.resize(size, Image.NEAREST if f >= 1 else Image.LANCZOS)


def thumbnail_uri(im: Image.Image, side: int) -> str:
    return png_data_uri(np.asarray(resize(im.convert("RGB"), side)))


def image_grid(rows: list[list[Image.Image]], cell: int, gap: int = 0) -> np.ndarray:
    """Rows of images, each resized to ``cell`` and followed by a white gutter of ``gap`` pixels (right and below);
    short rows are padded with white to the longest row's length."""
    blank = np.full((cell + gap, cell + gap, 3), 255, np.uint8)
    out = []
    for row in rows:
        cells = []
        for im in row:
            c = blank.copy()
            a = np.asarray(resize(im.convert("RGB"), cell))
            c[: a.shape[0], : a.shape[1]] = a
            cells.append(c)
        out.append(cells)
    width = max(1, max((len(r) for r in out), default=0))
    grid = np.concatenate([np.concatenate(r + [blank] * (width - len(r)), axis=1) for r in out] or [blank], axis=0)
    return grid[: grid.shape[0] - gap, : grid.shape[1] - gap] if gap else grid


# ----------------------------------------------------------------------------------------------------------------
# recipes as the plots group them

def chamfer_k(recipe) -> int | None:
    """The ``k`` of the recipe's first Chamfer energy, or None."""
    for e in recipe.energies:
        if e.name == "chamfer":
            return e.params.k
    return None


def unguided(recipe) -> bool:
    """Plain (classifier-free guided) sampling: no energy, no soft labels, no image prior."""
    return not recipe.energies and recipe.soft_labels is None and recipe.init_strength >= 1.0


def recipe_families(cfg, names: list[str]) -> list[tuple[str, list[str]]]:
    """Groups of recipes whose configs are equal once ``scale`` and ``images_per_class`` are removed, in the order
    first seen; each named by the members' common name prefix (without trailing separators) or their first name."""
    groups: dict[str, list[str]] = {}
    for n in names:
        d = cfg.recipes[n].model_dump()
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


# ----------------------------------------------------------------------------------------------------------------
# plots

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
