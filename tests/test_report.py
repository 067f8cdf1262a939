"""report.html: a hand-made run folder (real digits images in Parquet shards with their features column, the
reference bank built by the references stage), the page's structure, its plots, its bounded reads, its escaping
and a headless Chromium rendering of it."""

import base64
import io
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from factory.config import from_dict
from factory.data import load_real
from factory.plan import Plan, RecipePlan
from factory.plots import plot_accuracy_vs_scale, plot_coverage_vs_k, recipe_families
from factory.report import _best, shown_classes, write_report
from factory.shards import ShardSink

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

CONFIG = {
    "name": "report-test",
    "seed": 7,
    "data": {"source": "digits"},
    "backbone": {"name": "tiny", "checkpoint": "digits"},
    "features": {"name": "cnn", "checkpoint": "digits"},
    "output": {"formats": ["parquet"]},
    "recipes": {
        "cfg": {"cfg_scale": 2.0, "images_per_class": 12},
        "cfg_x2": {"cfg_scale": 2.0, "images_per_class": 24},
        "chamfer_k4": {"cfg_scale": 1.0, "images_per_class": 12,
                       "energies": [{"name": "chamfer", "weight": 0.15, "every": 5, "params": {"k": 4}}]},
        "chamfer_k32": {"cfg_scale": 1.0, "images_per_class": 12,
                        "energies": [{"name": "chamfer", "weight": 0.15, "every": 5, "params": {"k": 32}}]},
    },
}


# precision, recall, density, coverage, fd, hardness_mean (metrics.json is written by hand: scoring is tested
# elsewhere, and this keeps the test fast)
METRICS = {
    "cfg": (0.91, 0.62, 1.08, 0.71, 3.2, -61.5),
    "cfg_x2": (0.9, 0.7, 1.05, 0.8, 2.7, -61.1),
    "chamfer_k4": (0.97, 0.41, 1.31, 0.52, 5.9, -70.3),
    "chamfer_k32": (0.88, 0.75, 0.97, 0.86, 1.9, -58.4),
    "real": (0.93, 0.94, 1.0, 0.95, 0.4, -60.2),
}


def _metrics(p, r, d, c, fd, h, per_class):
    return {"precision": p, "recall": r, "density": d, "coverage": c, "f1_pc": 2 * p * c / (p + c), "fd": fd,
            "hardness_mean": h, "real_hardness_mean": -59.8, "real_hardness_std": 6.1,
            "num_images": 10 * per_class, "count_per_class": {str(i): per_class for i in range(10)}}


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _images(recipe: str, label: int, n: int, train, test, rng) -> list[np.ndarray]:
    """chamfer_k4 copies train images (a memorisation case); the others are jittered test images."""
    if recipe == "chamfer_k4":
        return list(train.of_class(label)[:n])
    pool = test.of_class(label)
    pick = pool[rng.integers(0, len(pool), n)].astype(np.int16)
    noise = rng.integers(-40, 41, pick.shape) if recipe != "chamfer_k32" else rng.integers(-10, 11, pick.shape)
    return list(np.clip(pick + noise, 0, 255).astype(np.uint8))


SHARD_SIZE = {"cfg_x2": 8}  # cfg_x2: 3 shards per class; the others one


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, local_ray):
    import torch

    from factory.generate import build_features
    from factory.stages.references import as_float, build_reference_bank, real_info

    out = str(tmp_path_factory.mktemp("report") / "run")
    cfg = from_dict(CONFIG)
    train, test = load_real("digits", "train"), load_real("digits", "test")
    features = build_features(cfg)
    sink = ShardSink(out, ["parquet"])
    rng = np.random.default_rng(0)
    recipes = []
    for name, r in cfg.recipes.items():
        size = SHARD_SIZE.get(name, r.images_per_class)
        recipes.append(RecipePlan(name, r.images_per_class, size))
        for label in range(10):
            images = _images(name, label, r.images_per_class, train, test, rng)
            with torch.no_grad():
                feats = features(as_float(np.stack(images))).float().numpy()
            records = [{"key": f"{name}_c{label:05d}_{i:07d}", "image": _png(a), "label": label,
                        "class_name": str(label), "seed": 1000 + label, "features": f.tolist()}
                       for i, (a, f) in enumerate(zip(images, feats))]
            for s in range(0, len(records), size):
                sink.commit(name, f"c{label:05d}-s{s // size:05d}", records[s:s + size], {})
    plan = Plan(recipes, list(range(10)), train.class_names, cfg.seed)
    build_reference_bank(cfg, out, real_info(cfg), plan.labels, progress=False)
    metrics = {name: _metrics(*values, cfg.recipes[name].images_per_class if name != "real" else 134)
               for name, values in METRICS.items()}
    metrics["cfg"]["downstream"] = {"synthetic": 0.71, "mixed": 0.93}
    metrics["cfg_x2"]["downstream"] = {"synthetic": 0.8, "mixed": 0.95}
    metrics["real"]["downstream"] = {"real": 0.96}
    provenance = {"factory": "0.1.0", "code_revision": "0123456789abcdef0123456789abcdef01234567",
                  "python": "3.11.2", "packages": {"torch": "2.0", "pyarrow": "14.0"},
                  "config": cfg.to_dict(), "output": out,
                  "wall_seconds": {"sampling": 12.5, "scoring": 1.25, "downstream": 30.0, "total": 44.0},
                  "shards": {"planned": 40, "made": 40, "already_complete": 0}}
    path = write_report(sink, plan, metrics, provenance)
    return path, metrics, plan, provenance


@pytest.fixture(scope="module")
def parquet_run(run_dir, tmp_path_factory):
    """The same run over the digits set written as a Parquet real set (one file per split and class), with its
    own bank: the report's real images come from row groups of the classes it shows."""
    from factory.shards import encode_parquet
    from factory.stages.references import build_reference_bank, real_info

    path, metrics, plan, provenance = run_dir
    tmp = tmp_path_factory.mktemp("parquet_run")
    root = tmp / "real"
    for split in ("train", "test"):
        real = load_real("digits", split)
        (root / split).mkdir(parents=True)
        for label in range(10):
            records = [{"key": f"{split}_{label}_{i:05d}", "image": _png(a), "label": label,
                        "class_name": real.class_names[label], "seed": 0} for i, a in enumerate(real.of_class(label))]
            (root / split / f"c{label:05d}.parquet").write_bytes(encode_parquet(records))
    out = str(tmp / "run")
    shutil.copytree(os.path.dirname(path), out, ignore=shutil.ignore_patterns("_references", "report.html"))
    cfg = from_dict({**CONFIG, "data": {"source": "parquet", "root": str(root)}})
    build_reference_bank(cfg, out, real_info(cfg), plan.labels, progress=False)
    return out, str(root), metrics, plan, {**provenance, "config": cfg.to_dict(), "output": out}


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.ids, self.h2, self.links, self.classes, self.scripts = [], [], [], [], [], 0
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if "id" in a:
            self.ids.append(a["id"])
        if "class" in a:
            self.classes.append((tag, a["class"]))
        for key in ("href", "src"):
            if key in a:
                self.links.append(a[key])
        self.scripts += tag == "script"
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data.strip())
            self._in_h2 = False


def _parse(path) -> tuple[str, Page]:
    text = open(path, encoding="utf-8").read()
    page = Page()
    page.feed(text)
    return text, page


def test_page_structure_and_images(run_dir):
    path, _, plan, _ = run_dir
    text, page = _parse(path)
    assert page.h2 == ["Metrics", "Plots", "Nearest train neighbours", "Samples", "Provenance"]
    assert {"metrics", "plots", "neighbours", "samples", "provenance"} <= set(page.ids)
    assert "not available" not in text and page.scripts == 0
    # self-contained: only in-page anchors and data: URIs
    assert all(u.startswith(("#", "data:image/png;base64,")) for u in page.links)
    outside_data = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert "http:" not in outside_data and "https:" not in outside_data and "url(" not in outside_data
    for img in page.imgs:
        data = base64.b64decode(img["src"].split(",", 1)[1], validate=True)
        im = Image.open(io.BytesIO(data))
        im.load()
        assert im.format == "PNG" and im.size[0] > 4 and im.size[1] > 4
    alts = [img["alt"] for img in page.imgs]
    for alt in ("coverage against k", "accuracy against scale", "hardness histograms"):
        assert alts.count(alt) == 1
    for r in plan.recipes:
        assert f"samples of {r.recipe}" in alts
    assert alts.count("synthetic") == alts.count("train neighbour") == 4 * len(plan.recipes)
    # provenance
    for s in ("0123456789abcdef0123456789abcdef01234567", "torch", "44.0 s", "already complete", "run seed",
              "chamfer_k32", "images / class"):
        assert s in text
    assert "<table>" in text  # the metrics table (test_run checks for it)


def test_metrics_best_highlight_and_legend(run_dir):
    path, metrics, _, _ = run_dir
    text, _ = _parse(path)
    table = text.split("<table>", 1)[1].split("</table>", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r'<th scope="row">([\w-]+)</th>(.*?)</tr>', table)}
    assert set(rows) == {"cfg", "cfg_x2", "chamfer_k4", "chamfer_k32"}
    # coverage is the 5th value column: the best synthetic recipe's cell is highlighted, no other
    synth = {n: metrics[n]["coverage"] for n in rows}
    best = max(synth.values())
    for n, row in rows.items():
        cells = re.findall(r"<td( class=\"best\")?>(.*?)</td>", row)
        assert (cells[4][0] != "") == (synth[n] == best), (n, cells[4])
        assert cells[4][1] == f"{metrics[n]['coverage']:.3f}"
    assert "accuracy<br>synthetic" in table and "95.0 %" in table
    for word in ("fidelity", "Diversity", "Fréchet", "Harmonic mean", "↑", "↓"):
        assert word.lower() in text.lower()


def test_memorised_recipe_is_flagged(run_dir):
    path, _, _, _ = run_dir
    text, _ = _parse(path)
    blocks = dict(re.findall(r'<div class="nn"><h3>([\w-]+)(.*?)</div></div>', text, re.S))
    assert "possible copies" in blocks["chamfer_k4"]
    assert blocks["chamfer_k4"].count('class="pair close"') == 4 and "d = 0.00" in blocks["chamfer_k4"]
    assert "possible copies" not in blocks["cfg"]


def _rewrite_without_features(folder: str) -> None:
    """Shards as made before features travelled with them: the same Parquet, no ``features`` column."""
    import pyarrow.parquet as pq

    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".parquet"):
                path = os.path.join(dirpath, f)
                pq.write_table(pq.read_table(path).drop_columns(["features"]), path)


def test_shards_without_features_or_bank_degrade_to_notes(run_dir, tmp_path):
    path, metrics, plan, provenance = run_dir
    out = str(tmp_path / "run")
    shutil.copytree(os.path.dirname(path), out)
    _rewrite_without_features(out)
    write_report(ShardSink(out, ["parquet"]), plan, metrics, provenance)
    text, page = _parse(f"{out}/report.html")
    assert page.h2 == ["Metrics", "Plots", "Nearest train neighbours", "Samples", "Provenance"]
    assert text.count("the shards have no features column") == 2  # plots and neighbours say why
    alts = [img["alt"] for img in page.imgs]
    assert "coverage against k" in alts and "accuracy against scale" in alts
    assert "hardness histograms" not in alts and "synthetic" not in alts
    assert sum(a.startswith("samples of ") for a in alts) == len(plan.recipes)
    # and without the reference bank: the panels that need it say so, the rest is there
    shutil.rmtree(f"{out}/_references")
    write_report(ShardSink(out, ["parquet"]), plan, metrics, provenance)
    text, page = _parse(f"{out}/report.html")
    assert "the reference bank not available: FileNotFoundError" in text
    alts = [img["alt"] for img in page.imgs]
    assert "coverage against k" in alts and sum(a.startswith("samples of ") for a in alts) == len(plan.recipes)


def test_reads_a_bounded_sample(run_dir, tmp_path, monkeypatch):
    """Row groups of the first shard of a few classes, the bank files of those classes only: nothing else."""
    import fsspec.implementations.local
    import pyarrow.parquet as pq

    path, metrics, plan, provenance = run_dir
    out = str(tmp_path / "run")
    shutil.copytree(os.path.dirname(path), out)
    for dirpath, _, files in os.walk(out):  # row groups of 2 rows: 5 rows are read from the first 3
        for f in files:
            if f.endswith(".parquet"):
                p = os.path.join(dirpath, f)
                pq.write_table(pq.read_table(p), p, row_group_size=2)
    read_groups, bank_files = [], []
    read_row_group = pq.ParquetFile.read_row_group
    cat_file = fsspec.implementations.local.LocalFileSystem.cat_file

    def counting_read_row_group(self, i, *args, **kwargs):
        table = read_row_group(self, i, *args, **kwargs)
        read_groups.append((table.num_rows, kwargs.get("columns")))
        return table

    def counting_cat_file(self, p, *args, **kwargs):
        if "/_references/" in str(p):
            bank_files.append(str(p).split("/_references/", 1)[1])
        return cat_file(self, p, *args, **kwargs)

    def no_whole_file(*args, **kwargs):
        raise AssertionError("the report read a whole Parquet file")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting_read_row_group)
    monkeypatch.setattr(pq, "read_table", no_whole_file)
    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "cat_file", counting_cat_file)
    write_report(ShardSink(out, ["parquet"]), plan, metrics, provenance, max_classes=3, rows_per_class=5,
                 real_per_class=20)
    shown = shown_classes(plan, 3)
    assert shown == [0, 4, 9] or shown == [0, 5, 9]
    # the first 3 row groups of the first shard of each (recipe, shown class), the shown columns only
    assert len(read_groups) == 3 * 3 * len(plan.recipes)
    assert all(n == 2 and cols == ["key", "image", "label", "features"] for n, cols in read_groups)
    # the bank: meta and the shown classes' train and test features, nothing of the other classes
    assert {f for f in bank_files if f.endswith(".npy")} == {f"{s}/c{c:05d}.npy" for s in ("train", "test")
                                                            for c in shown}
    assert set(bank_files) - {f for f in bank_files if f.endswith(".npy")} <= {"meta.json"}
    # what is shown is the sample: 3 classes x 5 images per grid, 5 images searched per class
    text, page = _parse(f"{out}/report.html")
    assert "not available" not in text and "3 of 10 classes" in text
    for img in page.imgs:
        if img["alt"].startswith("samples of "):
            im = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
            assert im.size == (5 * 39 - 3, 3 * 39 - 3)
    assert "distances are upper bounds" in text  # 20 of the ~140 train features per class


def test_real_images_are_read_for_the_shown_classes_only(parquet_run, monkeypatch):
    """With a Parquet real set, the nearest neighbours' real images are row groups of the shown classes' files:
    the report never loads a split."""
    import pyarrow.parquet as pq

    out, root, metrics, plan, provenance = parquet_run
    real_reads = []
    read_row_group = pq.ParquetFile.read_row_group

    def counting_read_row_group(self, i, *args, **kwargs):
        if kwargs.get("columns") == ["key", "image", "label", "class_name"]:  # ClassImages' read of the real set
            real_reads.append(self.metadata.num_rows)
        return read_row_group(self, i, *args, **kwargs)

    def no_whole_file(*args, **kwargs):
        raise AssertionError("the report read a whole Parquet file")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting_read_row_group)
    monkeypatch.setattr(pq, "read_table", no_whole_file)
    write_report(ShardSink(out, ["parquet"]), plan, metrics, provenance, max_classes=3)
    text, page = _parse(f"{out}/report.html")
    assert "not available" not in text
    alts = [img["alt"] for img in page.imgs]
    assert alts.count("synthetic") == alts.count("train neighbour") == 4 * len(plan.recipes)
    # at most one file per shown class, each a class's train images (~143 rows), never the 1,437 of the split
    train = load_real("digits", "train")
    sizes = {len(train.of_class(c)) for c in shown_classes(plan, 3)}
    assert 1 <= len(real_reads) <= 3 and set(real_reads) <= sizes


def test_run_text_is_escaped_and_the_page_is_deterministic(run_dir, tmp_path):
    path, metrics, plan, provenance = run_dir
    out = str(tmp_path / "run")
    shutil.copytree(os.path.dirname(path), out)
    names = list(plan.class_names)
    names[0] = "<script>alert(1)</script>"
    hostile = Plan(plan.recipes, plan.labels, names, plan.seed)
    prov = {**provenance, "config": {**provenance["config"], "name": "<img src=x onerror=alert(2)>"},
            "packages": {"<b>pkg</b>": "1 & 2"}}
    sink = ShardSink(out, ["parquet"])
    write_report(sink, hostile, metrics, prov)
    first = open(f"{out}/report.html", "rb").read()
    text, page = _parse(f"{out}/report.html")
    assert page.scripts == 0 and "<b>pkg" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # a grid row label and nearest-neighbour captions
    assert "&lt;img src=x onerror=alert(2)&gt;" in text and "&lt;b&gt;pkg&lt;/b&gt;" in text and "1 &amp; 2" in text
    write_report(sink, hostile, metrics, prov)
    assert open(f"{out}/report.html", "rb").read() == first


def test_helpers():
    cfg = from_dict(CONFIG)
    assert recipe_families(cfg, list(cfg.recipes)) == [("cfg", ["cfg", "cfg_x2"]), ("chamfer_k4", ["chamfer_k4"]),
                                                       ("chamfer_k32", ["chamfer_k32"])]
    assert _best({"a": 0.9, "b": 1.2, "c": None}, "one") == {"a"}
    assert _best({"a": 3.0, "b": 2.0}, "min") == {"b"} and _best({"a": 3.0}, "max") == set()
    # one chamfer recipe, or no two scales in a family: the plots are left out
    m = {n: {"coverage": 0.5, "downstream": {"synthetic": 0.5}} for n in cfg.recipes}
    one = from_dict({**CONFIG, "recipes": {k: CONFIG["recipes"][k] for k in ("cfg", "chamfer_k4")}})
    assert plot_coverage_vs_k(one, m, {}) is None
    assert plot_accuracy_vs_scale(one, m, {"cfg": 1.0, "chamfer_k4": 1.0}, {}) is None
    # the classes read back: all of a small plan, evenly spaced ones of a large one (first and last included)
    small = Plan([RecipePlan("r", 10, 10)], list(range(10)), [str(i) for i in range(10)], 3)
    assert shown_classes(small) == list(range(10))
    big = Plan([RecipePlan("r", 10, 10)], list(range(0, 2000, 2)), [str(i) for i in range(2000)], 3)
    shown = shown_classes(big, 10)
    assert len(shown) == 10 and shown[0] == 0 and shown[-1] == 1998 and shown == sorted(set(shown))


def _chromium(*args, tmp):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp}/profile", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp)


@pytest.mark.integration
def test_renders_in_headless_chromium(run_dir, tmp_path, system_package):
    system_package("chromium", CHROMIUM is not None, "the report is rendered headless")
    path, _, _, _ = run_dir
    shot = tmp_path / "shot.png"
    r = _chromium(f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars",
                  f"file://{os.path.abspath(path)}", tmp=tmp_path)
    assert shot.exists(), r.stderr[-2000:]
    im = np.asarray(Image.open(shot).convert("RGB"))
    assert im.shape[:2] == (2400, 1280)
    assert len(np.unique(im.reshape(-1, 3), axis=0)) > 50  # text, tables, plots: far from a single colour
    # every image decodes in the browser: a copy of the page with a probe script that counts loaded images
    probe = tmp_path / "probe.html"
    probe.write_text(open(path, encoding="utf-8").read().replace("</body>", (
        "<script>addEventListener('load',()=>{const i=[...document.images];document.body.dataset.probe="
        "i.length+'/'+i.filter(x=>x.complete&&x.naturalWidth>0).length;});</script></body>")), encoding="utf-8")
    r = _chromium("--dump-dom", "--virtual-time-budget=10000", f"file://{probe}", tmp=tmp_path)
    m = re.search(r'data-probe="(\d+)/(\d+)"', r.stdout)
    assert m, r.stderr[-2000:]
    assert int(m.group(1)) > 10 and m.group(1) == m.group(2)


def test_metrics_table_names_the_prdc_k_with_downstream_columns():
    from factory.report import metrics_view

    row = {"precision": 0.9, "recall": 0.8, "density": 1.0, "coverage": 0.95, "f1_pc": 0.92, "fd": 0.1,
           "hardness_mean": -100.0, "num_images": 10, "downstream": {"synthetic": 0.9}}
    view = metrics_view({"cfg": row, "real": {**row, "downstream": {"real": 0.95}}}, k=5)
    assert view["k"] == 5 and view["modes"] == ["synthetic", "real"]
    cells = {r["name"]: [c["text"] for c in r["cells"]] for r in view["rows"]}
    assert cells["cfg"][-2:] == ["90.0 %", "–"] and cells["real"][-2:] == ["–", "95.0 %"]
    assert [h["lines"] for h in view["headers"][-2:]] == [["accuracy", "synthetic"], ["accuracy", "real"]]


def test_metrics_table_shows_seeds_as_mean_and_std_and_a_row_without_scores():
    from factory.report import metrics_view

    view = metrics_view({"cfg": {"precision": 0.9, "downstream": {"synthetic": 0.9}, "downstream_std": {"synthetic": 0.012}},
                         "random_real": {"num_images": 100, "downstream": {"real": 0.91}}})
    cells = {r["name"]: [c["text"] for c in r["cells"]] for r in view["rows"]}
    assert cells["cfg"][-2:] == ["90.0 ± 1.2 %", "–"] and cells["random_real"][-2:] == ["–", "91.0 %"]
    precision = [h["key"] for h in view["headers"]].index("precision")
    assert cells["random_real"][precision] == "–"  # the score stage does not judge a real subset


def test_label_agreement_has_a_column_only_when_a_set_has_it():
    from factory.report import metrics_view

    row = {"precision": 0.9, "coverage": 0.95, "fd": 0.1, "num_images": 10}
    keys = lambda view: [h["key"] for h in view["headers"]]
    assert "label_agreement" not in keys(metrics_view({"cfg": row}))  # a metrics.json from before the metric
    view = metrics_view({"cfg": {**row, "label_agreement": 0.604}, "real": row})
    cells = {r["name"]: [c["text"] for c in r["cells"]] for r in view["rows"]}
    i = keys(view).index("label_agreement")
    assert cells["cfg"][i] == "0.604" and cells["real"][i] == "–"
    assert any("k nearest real test images" in item["text"] for item in view["legend"])
