"""The score stage: metrics from the shards' feature columns and the reference bank, in parallel Ray tasks.

No pixel is decoded and nothing is embedded: each image's feature vector in the run's evaluation space is a
column of its Parquet shard, and the real splits' features are the bank's. A task takes a chunk of classes
of one set (a recipe, or "real": the train split) and returns, per class, PRDC and F1 against that class's
test images (the papers' per-class view) and hardness sums; for the set as a whole, FD moments and a
seeded subsample. The driver merges those (memory O(D² + pool·D), whatever the number of images) and one
more task computes pooled PRDC on the subsamples. The views, as metrics.json states them:

- ``precision`` … ``coverage``, ``f1_pc``: pooled PRDC of at most ``eval.pool`` synthetic images (a seeded
  subsample, dgm-eval's 10,000) against at most as many test images; all of them when the sets are smaller,
  which keeps the quickstart's numbers what they were; ``label_agreement`` on the same pools: the share of
  synthetic images whose k nearest test images vote for the image's own class;
- ``fd``: Fréchet distance from moments streamed over every image; ``hardness_mean``: over every image;
- ``per_class``: PRDC / F1 per class on all of that class's images (k capped by the class's size).

The column holds the features of each image as quantised to uint8 (what a PNG shard decodes to exactly);
with a lossy ``output.codec`` (JPEG, WebP) they are those of the image before compression.
"""

from __future__ import annotations

import math

import numpy as np

POOL = 10_000  # images per side in the pooled PRDC (dgm-eval's default)


def _class_features(fs, root: str, recipe: str, label: int) -> np.ndarray | None:
    """float32 (n, D) of one class of a recipe, from its shards' ``features`` column; None without one."""
    import pyarrow.parquet as pq

    files = sorted(fs.glob(f"{root}/{recipe}/parquet/c{label:05d}-s*.parquet"))
    parts = []
    for f in files:
        if "features" not in pq.read_schema(f, filesystem=fs).names:  # the footer only
            return None
        col = pq.read_table(f, filesystem=fs, columns=["features"]).column("features").combine_chunks()
        parts.append(np.asarray(col.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(col), -1))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _keep(n: int, p: float, seed: int, label: int, salt: int) -> np.ndarray:
    """A seeded subsample mask of n rows, each kept with probability p (all of them when p >= 1)."""
    if p >= 1.0:
        return np.ones(n, dtype=bool)
    return np.random.default_rng([seed, label, salt]).random(n) < p


def score_chunk(output: str, storage_options, name: str, labels: list[int], k: int, seed: int,
                p_fake: float, p_test: float, salt: int) -> dict:
    """One task: the classes ``labels`` of set ``name`` (a recipe, or "real" for the bank's train split)."""
    import fsspec
    import torch

    from factory import metrics
    from factory.bank import ReferenceBank

    bank = ReferenceBank(output, storage_options)
    var = bank.meta()["feature_var"]
    fs, root = fsspec.core.url_to_fs(output.rstrip("/"), **(storage_options or {}))
    per_class, fake_m, test_m = {}, None, None
    h_sum = h_n = 0.0
    th_sum = th_sq = th_n = 0.0
    fake_pool, test_pool, fake_lab, test_lab = [], [], [], []
    for c in labels:
        train = bank.features("train", c)
        test = bank.features("test", c)
        fake = train.numpy() if name == "real" else _class_features(fs, root, name, c)
        if fake is None:
            raise ValueError(f"{name}: shards of class {c} have no features column (made before features travelled "
                             "with the shard): rerun with --stages sample,score over a fresh output")
        fake = torch.from_numpy(fake)
        if fake_m is None:
            fake_m, test_m = metrics.Moments(fake.shape[1]), metrics.Moments(fake.shape[1])
        fake_m.add(fake)
        test_m.add(test)
        gauss = metrics.ClassGaussian(train, torch.zeros(len(train), dtype=torch.long), num_classes=1,
                                      feature_var=var)
        if len(fake):
            h = gauss.hardness(fake.double(), 0)
            h_sum, h_n = h_sum + h.sum().item(), h_n + len(h)
        th = gauss.hardness(test.double(), 0)
        th_sum, th_sq, th_n = th_sum + th.sum().item(), th_sq + th.pow(2).sum().item(), th_n + len(th)
        kc = min(k, len(fake) - 1, len(test) - 1)
        row = {"num_images": int(len(fake))}
        if kc >= 1:
            m = metrics.prdc(test, fake, k=kc)
            m["f1_pc"] = metrics.f1(m["precision"], m["coverage"])
            row.update({key: round(float(v), 6) for key, v in m.items()}, k=kc)
        per_class[c] = row
        fake_pool.append(fake[torch.from_numpy(_keep(len(fake), p_fake, seed, c, salt))])
        test_pool.append(test[torch.from_numpy(_keep(len(test), p_test, seed, c, 1))])
        fake_lab.append(torch.full((len(fake_pool[-1]),), c, dtype=torch.long))
        test_lab.append(torch.full((len(test_pool[-1]),), c, dtype=torch.long))
    return {"per_class": per_class, "fake_moments": fake_m, "test_moments": test_m,
            "hardness": (h_sum, h_n), "test_hardness": (th_sum, th_sq, th_n),
            "fake_pool": (torch.cat(fake_pool), torch.cat(fake_lab)),
            "test_pool": (torch.cat(test_pool), torch.cat(test_lab))}


def pooled_prdc(test_pool, fake_pool, k: int) -> dict:
    """PRDC, F1 and label agreement on the pools: (features, labels) each."""
    from factory import metrics

    m = metrics.prdc(test_pool[0], fake_pool[0], k=k)
    m["f1_pc"] = metrics.f1(m["precision"], m["coverage"])
    m["label_agreement"] = metrics.label_agreement(test_pool[0], test_pool[1], fake_pool[0], fake_pool[1], k=k)
    return m


def score_sets(cfg, output: str, sets: dict[str, int], labels: list[int], class_names: list[str],
               storage_options: dict | None = None, chunk: int = 16, progress: bool = True) -> dict:
    """metrics.json content for ``sets`` (name -> expected images: a recipe's plan, or the train size for "real")."""
    import ray
    from tqdm import tqdm

    from factory import metrics
    from factory.bank import ReferenceBank

    bank = ReferenceBank(output, storage_options)
    meta = bank.meta()
    n_test = sum(meta["counts"]["test"][c] for c in labels)
    p_test = POOL / n_test if n_test else 1.0
    task = ray.remote(num_cpus=1)(score_chunk)
    pooled = ray.remote(num_cpus=1)(pooled_prdc)
    chunks = [labels[i:i + chunk] for i in range(0, len(labels), chunk)]
    out = {}
    bar = tqdm(total=len(sets) * len(chunks), desc="score", unit="chunk", disable=not progress)
    for salt, (name, expected) in enumerate(sets.items(), start=2):
        p_fake = POOL / expected if expected else 1.0
        refs = [task.remote(output, storage_options, name, ch, cfg.eval.k, cfg.seed, p_fake, p_test, salt)
                for ch in chunks]
        per_class, fake_m, test_m = {}, None, None
        h, th = [0.0, 0.0], [0.0, 0.0, 0.0]
        fake_pool, test_pool = [], []
        while refs:  # merge as results arrive: the driver holds moments and pools, never a whole set
            done, refs = ray.wait(refs, num_returns=1)
            r = ray.get(done[0])
            per_class.update(r["per_class"])
            fake_m = r["fake_moments"] if fake_m is None else fake_m.merge(r["fake_moments"])
            test_m = r["test_moments"] if test_m is None else test_m.merge(r["test_moments"])
            h = [a + b for a, b in zip(h, r["hardness"])]
            th = [a + b for a, b in zip(th, r["test_hardness"])]
            fake_pool.append(r["fake_pool"])
            test_pool.append(r["test_pool"])
            bar.update(1)
        import torch

        fake_pool = tuple(torch.cat(part) for part in zip(*fake_pool))
        test_pool = tuple(torch.cat(part) for part in zip(*test_pool))
        k = min(cfg.eval.k, len(fake_pool[0]) - 1, len(test_pool[0]) - 1)
        m = ray.get(pooled.remote(test_pool, fake_pool, k))
        m["fd"] = metrics.frechet_from_moments(*test_m.mean_cov(), *fake_m.mean_cov())
        m["hardness_mean"] = h[0] / h[1] if h[1] else float("nan")
        m["real_hardness_mean"] = th[0] / th[2]
        m["real_hardness_std"] = math.sqrt(max(th[1] - th[0] ** 2 / th[2], 0.0) / max(th[2] - 1, 1))
        m = {key: float(v) for key, v in m.items()}
        m["num_images"] = int(fake_m.n)
        m["count_per_class"] = {class_names[c]: per_class[c]["num_images"] for c in labels}
        m["per_class"] = {class_names[c]: {key: v for key, v in per_class[c].items() if key != "num_images"}
                          for c in labels}
        m["views"] = {"pooled": f"PRDC / F1 on a seeded subsample of at most {POOL} images per side "
                                f"({len(fake_pool[0])} synthetic, {len(test_pool[0])} test here), k = {k}",
                      "label_agreement": f"the vote of each pooled synthetic image's {k} nearest pooled test images",
                      "fd": f"moments over all {fake_m.n} images vs all {test_m.n} test images",
                      "per_class": "PRDC / F1 per class on all of its images, k = min(eval.k, class size - 1)"}
        out[name] = m
    bar.close()
    return out
