"""report.html: one self-contained page per run (metrics table, a sample grid per recipe, provenance)."""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np
from PIL import Image

from factory.data import decode_image
from factory.plan import Plan
from factory.shards import ShardSink

METRIC_COLUMNS = ["num_images", "precision", "recall", "density", "coverage", "f1_pc", "fd", "hardness_mean",
                  "downstream"]


def _png_data_uri(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def sample_grid(sink: ShardSink, plan: Plan, recipe: str, per_class: int = 12, cell: int = 32) -> np.ndarray:
    """Rows = classes, columns = the first ``per_class`` images of the class's first shard, upscaled."""
    import pyarrow.parquet as pq

    rows = []
    for label in plan.labels:
        path = sink.path(recipe, "parquet", f"c{label:05d}-s00000")
        table = pq.read_table(path, filesystem=sink.fs, columns=["key", "image"]).slice(0, per_class)
        cells = []
        for key, data in zip(table.column("key").to_pylist(), table.column("image").to_pylist()):
            im = decode_image(data, f"{path}:{key}").convert("RGB").resize((cell, cell), Image.NEAREST)
            cells.append(np.asarray(im))
        while len(cells) < per_class:
            cells.append(np.full((cell, cell, 3), 255, np.uint8))
        rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(rows, axis=0)


def _fmt(v) -> str:
    if isinstance(v, dict):
        return "<br>".join(f"{html.escape(str(k))}: {_fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def render(metrics: dict, grids: dict[str, str], provenance: dict, class_names: list[str]) -> str:
    head = "".join(f"<th>{c}</th>" for c in ["recipe"] + METRIC_COLUMNS)
    body = "".join(
        "<tr>" + f"<td>{html.escape(name)}</td>" + "".join(f"<td>{_fmt(m.get(c, ''))}</td>" for c in METRIC_COLUMNS)
        + "</tr>"
        for name, m in metrics.items()
    )
    grid_html = "".join(
        f'<figure><img alt="samples of {html.escape(r)}" src="{uri}"><figcaption>{html.escape(r)}: rows are '
        f"classes {html.escape(', '.join(class_names))}</figcaption></figure>"
        for r, uri in grids.items()
    )
    prov = html.escape(json.dumps(provenance, indent=1, sort_keys=True, default=str))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>factory report: {html.escape(str(provenance.get('config', {}).get('name', '')))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
figure{{display:inline-block;margin:1em}}img{{image-rendering:pixelated}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style>
</head><body>
<h1>Synthetic data report</h1>
<p>Metrics of each recipe's synthetic set against the real test split, in the evaluation feature space
(k-NN precision / recall / density / coverage after Naeem et al. 2020; F1 of precision and coverage;
Fréchet distance; mean class-Gaussian hardness), and the real test accuracy of a ResNet trained on each set
(<em>downstream</em>, by training mode). The row <em>real</em> is the real train split, for reference.</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Samples</h2>{grid_html}
<h2>Provenance</h2><pre>{prov}</pre>
</body></html>
"""


def write_report(sink: ShardSink, plan: Plan, metrics: dict, provenance: dict) -> str:
    grids = {r.recipe: _png_data_uri(sample_grid(sink, plan, r.recipe)) for r in plan.recipes}
    page = render(metrics, grids, provenance, [plan.class_names[i] for i in plan.labels])
    path = f"{sink.root}/report.html"
    sink.put(path, page.encode())
    return path
