"""The shard plan: (recipe, class, shard index) -> seed, image count and file names, computed, never stored.

A plan is arithmetic over a few per-recipe numbers, so a plan of 13M images (10x ImageNet-1k) is
built in microseconds and any shard is looked up by its global id in O(log recipes). Nothing in it
depends on timing, workers or order: a shard's identity and seed are a function of the config alone.

``factory plan`` is built here too: :func:`plan_for_config` sizes a run from its config (without reading
the real data when the config declares its sizes), and :func:`estimate` turns the plan into device-hours
and cost on a GPU type from plain-data tables of measured rates, FLOP counts, peaks and prices, and into
bytes of storage from a table of measured bytes per image per codec and resolution.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    shard_id: int  # global position in the plan
    recipe: str
    label: int  # class id
    class_name: str
    index: int  # shard index within (recipe, class)
    num_images: int
    first_image: int  # index of this shard's first image within (recipe, class)
    seed: int

    @property
    def name(self) -> str:
        """Deterministic file stem, e.g. ``c00003-s00002``."""
        return f"c{self.label:05d}-s{self.index:05d}"

    def key(self, i: int) -> str:
        """Sample key of image ``i`` of this shard (no dots, so WebDataset can split extensions)."""
        return f"{self.recipe}_c{self.label:05d}_{self.first_image + i:07d}"


def shard_seed(run_seed: int, recipe: str, label: int, index: int) -> int:
    """63-bit seed from (run seed, recipe, class, shard index), stable across machines and versions."""
    h = hashlib.sha256(f"{run_seed}/{recipe}/{label}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class RecipePlan:
    recipe: str
    images_per_class: int
    shard_size: int

    @property
    def shards_per_class(self) -> int:
        return math.ceil(self.images_per_class / self.shard_size)


class Plan:
    """Shards of several recipes over a fixed list of classes, in (recipe, class, index) order."""

    def __init__(self, recipes: list[RecipePlan], labels: list[int], class_names: list[str], seed: int):
        if not labels:
            raise ValueError("a plan needs at least one class")
        self.recipes = list(recipes)
        self.labels = list(labels)
        self.class_names = list(class_names)  # indexed by label
        self.seed = seed
        counts = [r.shards_per_class * len(self.labels) for r in self.recipes]
        self._offsets = [0]
        for c in counts:
            self._offsets.append(self._offsets[-1] + c)

    def __len__(self) -> int:
        return self._offsets[-1]

    @property
    def num_images(self) -> int:
        return sum(r.images_per_class * len(self.labels) for r in self.recipes)

    def shard(self, shard_id: int) -> Shard:
        if not 0 <= shard_id < len(self):
            raise IndexError(f"shard id {shard_id} outside the plan of {len(self)} shards")
        r = bisect.bisect_right(self._offsets, shard_id) - 1
        rp = self.recipes[r]
        local = shard_id - self._offsets[r]
        class_pos, index = divmod(local, rp.shards_per_class)
        label = self.labels[class_pos]
        first = index * rp.shard_size
        n = min(rp.shard_size, rp.images_per_class - first)
        return Shard(
            shard_id=shard_id,
            recipe=rp.recipe,
            label=label,
            class_name=self.class_names[label],
            index=index,
            num_images=n,
            first_image=first,
            seed=shard_seed(self.seed, rp.recipe, label, index),
        )

    def recipe_range(self, recipe: str) -> range:
        r = [p.recipe for p in self.recipes].index(recipe)
        return range(self._offsets[r], self._offsets[r + 1])

    def __iter__(self):
        return (self.shard(i) for i in range(len(self)))


def images_per_class(scale: float, explicit: int | None, train_size: int, num_classes: int) -> int:
    """Images per class: explicit, or ``ceil(scale * train_size / num_classes)`` (1x = the train size)."""
    if explicit is not None:
        return explicit
    return max(1, math.ceil(scale * train_size / num_classes))


# ----------------------------------------------------------------------------- a run's plan from its config


def declared_classes(cfg) -> int | None:
    """Classes a run of ``cfg`` makes, when the config alone says (``data.classes`` or ``data.num_classes``)
    and every recipe's images per class follows from it (explicit, or ``data.train_size`` and
    ``data.num_classes`` declared for a scale); None when the real train split must be read to know."""
    d = cfg.data
    selected = len(d.classes) if d.classes is not None else d.num_classes
    if selected is None:
        return None
    for r in cfg.recipes.values():
        if r.images_per_class is None and (d.train_size is None or d.num_classes is None):
            return None
    return selected


def resolve_labels(cfg, real) -> list[int]:
    """The labels of ``data.classes`` in the real set (all of its classes without it)."""
    if cfg.data.classes is None:
        return list(range(real.num_classes))
    labels = []
    for i, name in enumerate(cfg.data.classes):
        if name not in real.class_names:
            from factory.config import ConfigError

            raise ConfigError(
                f"data.classes[{i}]: unknown class {name!r} for data source {cfg.data.source!r}; "
                f"known classes: {', '.join(real.class_names)}"
            )
        labels.append(real.class_names.index(name))
    return labels


def build_plan(cfg, train) -> Plan:
    """The run's plan from its real train split: a loaded ``RealSet`` or a ``RealInfo`` (metadata only)."""
    labels = resolve_labels(cfg, train)
    size = train.train_size() if hasattr(train, "train_size") else len(train.labels)
    recipes = [
        RecipePlan(name, images_per_class(r.scale, r.images_per_class, size, train.num_classes),
                   cfg.sampling.shard_size)
        for name, r in cfg.recipes.items()
    ]
    return Plan(recipes, labels, train.class_names, cfg.seed)


def plan_for_config(cfg, train=None) -> Plan:
    """The shard plan of a run of ``cfg``.

    With ``train`` (the real train split) or when the config does not declare its sizes, this is exactly
    the run's plan (:func:`build_plan`; the split is read here when not given). When it does
    (:func:`declared_classes`), nothing is read: shard counts, image counts and per-class shard sizes are
    the run's, while labels are positions in ``data.classes`` (or 0..num_classes-1), which is what the run
    uses only when the real set holds exactly those classes in that order.
    """
    n = declared_classes(cfg) if train is None else None
    if n is None:
        if train is None:
            from factory.data import load_real

            train = load_real(cfg.data.source, "train", cfg.data.root)
        return build_plan(cfg, train)
    d = cfg.data
    names = list(d.classes) if d.classes is not None else [str(i) for i in range(n)]
    recipes = [RecipePlan(name, images_per_class(r.scale, r.images_per_class, d.train_size or 0, d.num_classes or n),
                          cfg.sampling.shard_size)
               for name, r in cfg.recipes.items()]
    return Plan(recipes, list(range(n)), names, cfg.seed)


# ----------------------------------------------------------------------------- throughput and cost
#
# Plain data, edited by hand. A run's device-hours are its images over a rate in images per second per
# device, taken (1) from --img-per-s, else (2) from MEASURED below, else (3) estimated from the FLOPs of the
# recipe's sampling (BACKBONE_TFLOPS) and the device's dense bf16 peak at an assumed MFU (--mfu). The
# output always says which.

# Devices: dense bf16 tensor peak in TFLOP/s (vendor datasheets, without sparsity; H100/H200/A100 are the
# figures factory.bench.PEAK_TFLOPS uses for MFU) and default USD per device-hour (one GPU, or one vCPU for
# "cpu"): the instance's list price over its GPUs. Prices are approximate and change often; pass
# --price-per-gpu-hour for yours.
#   h100: AWS p5 on demand ~$3.90/GPU-h after the June 2025 price cut, p5 spot ~$2.00-2.50 (costnimbus.com,
#         "GPU cost management for ML teams", March 2026).
#   h200: AWS EC2 Capacity Blocks p5e, $5.408/GPU-h (us-east-2; the AWS Capacity Blocks pricing page).
#   a100: GCP a2-highgpu-1g (1x A100 40 GB), $3.67/h on demand (us-central1 list price).
#   l40s: AWS g6e.xlarge (1x L40S), $1.861/h on demand (us-east-1 list price).
#   a10g: AWS g5.xlarge (1x A10G), $1.006/h on demand (us-east-1 list price); A10G's bf16 tensor peak is
#         70 TFLOP/s (Baseten, "NVIDIA A10 vs A10G for ML model inference"; the A10's is 125).
#   l4:   AWS g6.xlarge / GCP g2-standard-4 (1x L4), ~$0.80/h on demand.
#   cpu:  one vCPU of a c6i.4xlarge ($0.68/h for 16 vCPU, us-east-1), the embedded tiny model's device.
# Spot prices other than h100's are not published figures: they assume 60 % off on demand (hyperscaler
# spot discounts for GPUs ran 50-70 % in 2025-2026), and the output says so.
SPOT_DISCOUNT = 0.6
DEVICES = {
    # key: (description, peak dense bf16 TFLOP/s or None, on-demand $/h, spot $/h or None = assumed discount, unit)
    "h100": ("NVIDIA H100 SXM 80GB", 989.0, 3.90, 2.25, "GPU"),
    "h100-pcie": ("NVIDIA H100 PCIe 80GB", 756.0, 3.90, None, "GPU"),
    "h200": ("NVIDIA H200 141GB", 989.0, 5.41, None, "GPU"),
    "a100": ("NVIDIA A100 (40/80GB)", 312.0, 3.67, None, "GPU"),
    "l40s": ("NVIDIA L40S 48GB", 362.0, 1.861, None, "GPU"),
    "a10g": ("NVIDIA A10G 24GB", 70.0, 1.006, None, "GPU"),
    "l4": ("NVIDIA L4 24GB", 121.0, 0.80, None, "GPU"),
    "cpu": ("one x86 vCPU (c6i)", None, 0.0425, None, "vCPU"),
}
DEFAULT_MFU = 0.30  # assumed where nothing was measured (see MEASURED_MFU)

# Model FLOP utilisation measured by `factory bench --suite gpu` (eager bf16, the actors' default; random
# weights; docs/benchmarks.md "GPU suite", one NVIDIA H200, 2026-11-26), by backbone and how a recipe guides:
# "none" plain CFG; "vae" / "tiny" a Chamfer-type energy through that guidance decoder; "ot" DMGD's OT term.
# A recipe's rate is then the device's peak x this MFU / the recipe's own FLOPs per image (its steps, CFG
# and guided steps), so one measurement serves every job. The H100 has the H200's compute peak and less
# memory bandwidth: its rows reuse the H200's figures, and the output says so.
MEASURED_MFU = {
    "dit-xl-2": {"none": 0.342, "vae": 0.251, "tiny": 0.287, "ot": 0.276},
    "sd15": {"none": 0.267, "vae": 0.180, "tiny": 0.232, "ot": 0.212},
    "sd35m": {"none": 0.299, "vae": 0.232, "tiny": 0.278, "ot": 0.249},
}
MEASURED_MFU_DEVICES = {"h200": "measured on an H200", "h100": "measured on an H200 (same bf16 peak), not an H100"}

# Measured sampling rates (images/s per device): (backbone, checkpoint or "*", guidance or "*", device,
# img/s, where it comes from). No GPU figure has been measured yet: docs/benchmarks.md says no GPU was lent
# to that session, and its CPU bench rows are for the tiny *test* architectures, not a real model. Add a
# row from `factory bench --size full ...` on the device, at the recipe's steps, CFG and guidance.
MEASURED = [
    ("tiny", "digits", "*", "cpu", 9.2,
     "README quickstart: 4 recipes x 1,350 digits images in 294 s of sampling, 2 actors on 2 shared cores"),
    ("tiny", "fashion_mnist", "*", "cpu", 4.6,
     "README Fashion-MNIST run: 4 recipes x 2,000 28x28 images in 29 min of sampling, 2 actors on 2 busy cores"),
]

# FLOPs per image of each part of sampling, in TFLOP at the backbone's native resolution with DINOv2-L/14
# features at 224 px, counted by `factory bench --size full --flops-only` (FlopCounterMode; the by-part
# table of docs/benchmarks.md, "Full-size FLOPs per image", batch 8) and divided by the part's step count:
#   denoiser:          one denoiser forward (a CFG step runs two): sd15 40.16 / (25 x 2); sd35m 281.2 / 25
#                      (CFG 1 row); dit-xl-2 11.87 / (25 x 2)
#   decode:            the guidance decoder's forward, per guided step: sd15 12.57 / 5 (vae), 0.71 / 5 (tiny
#                      TAESD); sd35m 52.36 / 5; dit-xl-2 3.111 / 5
#   features:          DINOv2-L forward per guided step, 0.81 / 5 (CLIP ViT-L/14 at 224 px is the same size)
#   backward:          the backward through features and decoder (grad through x0): sd15 13.59 / 5 (vae),
#                      and (10.78 - 5 x 1.844) / 5 for tiny; sd35m 133.3 / 5 - 15.48; dit-xl-2 3.964 / 5
#   denoiser_backward: the extra backward through one denoiser forward (grad through the model): sd15
#                      (22.81 - 13.59) / (5 x 2); sd35m (210.7 - 133.3) / 5; dit-xl-2 (5.19 - 3.964) / 5
#   final_decode:      the VAE decode of the result, once per image
# Checked against direct counts of job settings with the same command: sd15 chamfer CFG 1, 40 steps,
# every 5 -> 85.18 TFLOP/img (model: 85.2); dit-xl-2 chamfer CFG 1.5, 50 steps -> 45.03 (model: 45.0).
BACKBONE_TFLOPS = {
    "sd15": {"px": 512, "denoiser": 0.8032, "decode": {"vae": 2.514, "tiny": 0.142}, "features": 0.162,
             "backward": {"vae": 2.718, "tiny": 0.312}, "denoiser_backward": 0.922, "final_decode": 2.515},
    "sd35m": {"px": 1024, "denoiser": 11.25, "decode": {"vae": 10.47}, "features": 0.162,
              "backward": {"vae": 11.18}, "denoiser_backward": 15.48, "final_decode": 10.47},
    "dit-xl-2": {"px": 256, "denoiser": 0.2374, "decode": {"vae": 0.6222}, "features": 0.162,
                 "backward": {"vae": 0.793}, "denoiser_backward": 0.245, "final_decode": 0.6222},
}


# Mean bytes per image of factory.shards.encode_image at quality 90 (docs/benchmarks.md, "Bytes per image"):
# 8 px: the digits train split (grey); 28 px: 200 samples of the packaged Fashion-MNIST tiny UNet (grey);
# 256 px: 32 crops of scikit-learn's two sample photographs (RGB). Other sizes scale the nearest by area.
BYTES_PER_IMAGE = {
    8: {"png": 123, "jpeg": 213, "webp": 131},
    28: {"png": 630, "jpeg": 618, "webp": 440},
    256: {"png": 115_621, "jpeg": 21_121, "webp": 18_405},
}
SOURCE_PX = {"digits": 8, "fashion_mnist": 28}  # the embedded real sets' image sides


def storage_estimate(cfg, images: int) -> dict:
    """Bytes a run of ``images`` writes in ``output.codec`` (every format holds each image once; a tar adds
    its headers), at the real set's resolution: ``data.image_size``, else the embedded set's, else the
    backbone's native one (assumed)."""
    codec = cfg.output.codec
    px, where = getattr(cfg.data, "image_size", None), "data.image_size"
    if px is None and cfg.data.source in SOURCE_PX:
        px, where = SOURCE_PX[cfg.data.source], f"the {cfg.data.source} images"
    if px is None and cfg.backbone.name in BACKBONE_TFLOPS:
        px = BACKBONE_TFLOPS[cfg.backbone.name]["px"]
        where = f"ASSUMED: {cfg.backbone.name}'s native size, declare data.image_size"
    if px is None:
        return {"codec": codec, "px": None, "bytes_per_image": None, "bytes": None,
                "source": "resolution unknown: declare data.image_size"}
    near = min(BYTES_PER_IMAGE, key=lambda m: (abs(math.log(px / m)), m))
    per = BYTES_PER_IMAGE[near][codec] * (px / near) ** 2
    how = "measured" if near == px else f"scaled by area from {near} px"
    if codec != "png" and cfg.output.quality != 90:
        how += f"; at quality 90, not the config's {cfg.output.quality}"
    # a WebDataset sample is 3 tar members: 3 headers of 512 B, the image padded to 512 B, .cls and .json
    tar = 3 * 512 + 512 * math.ceil(per / 512) + 2 * 512
    per_format = {f: (tar if f == "webdataset" else per) for f in cfg.output.formats}
    return {"codec": codec, "px": px, "bytes_per_image": per, "per_format": per_format,
            "bytes": images * sum(per_format.values()), "source": f"{px} px ({where}), {how} (docs/benchmarks.md)"}


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def guidance_key(recipe) -> str:
    """"none", an energy name, or energy names joined by "+": the guidance column of MEASURED."""
    return "+".join(sorted({e.name for e in recipe.energies})) or "none"


def _energy_terms(e) -> int:
    """Backward passes an energy takes per guided step (low-density: one per non-zero term, as the sampler)."""
    if e.name == "lowdensity":
        return int(e.params.alpha != 0.0) + int(e.params.beta > 0.0)
    return 1


def guided_schedule(steps: int, recipe) -> tuple[int, int, int]:
    """(sampling steps, guided steps, backward passes) of one image of ``recipe``, by the sampler's rules:
    an img2img start (init_strength < 1) skips the first steps, and an energy is active on step i of n when
    ``i % every == 0`` and ``window[0] <= i / n <= window[1]``."""
    n = steps
    if recipe.init_strength < 1.0:
        n = steps - min(int(round(steps * (1.0 - recipe.init_strength))), steps - 1)
    guided = passes = 0
    for i in range(n):
        active = [e for e in recipe.energies
                  if i % e.every == 0 and e.window[0] <= i / n <= e.window[1] and _energy_terms(e)]
        guided += bool(active)
        passes += sum(_energy_terms(e) for e in active)
    return n, guided, passes


def recipe_tflops(cfg, recipe) -> tuple[float | None, list[str]]:
    """Estimated TFLOP per image of ``recipe`` under ``cfg`` (None when there is no FLOP model), and notes."""
    parts = BACKBONE_TFLOPS.get(cfg.backbone.name)
    if parts is None:
        return None, []
    notes = []
    opts = cfg.backbone.options
    decoder = opts.get("guidance_decoder", "vae")
    if decoder not in parts["decode"]:
        notes.append(f"no FLOP count for guidance_decoder {decoder!r} on {cfg.backbone.name}: the VAE's is used")
        decoder = "vae"
    area = 1.0
    if opts.get("resolution") is not None:
        r = opts["resolution"]
        h, w = (r, r) if isinstance(r, int) else r
        area = h * w / parts["px"] ** 2
        if area != 1.0:
            notes.append(f"resolution {h}x{w}: FLOPs scaled from {parts['px']} px by pixel count (approximate)")
    n, guided, passes = guided_schedule(cfg.sampling.steps, recipe)
    forwards = 1 if recipe.cfg_scale == 1.0 else 2  # CFG runs the unconditional pass too
    feats = parts["features"]  # the feature model runs at its own size; its backward is taken as one forward
    per_pass = (parts["backward"][decoder] - feats) * area + feats  # every energy term backpropagates once
    if recipe.grad_through == "model":
        per_pass += forwards * parts["denoiser_backward"] * area
    r = recipe.recurrence  # self-recurrence runs each guided step r times, its denoiser passes included
    total = ((n + (r - 1) * guided) * forwards * parts["denoiser"] * area
             + r * guided * (parts["decode"][decoder] * area + feats) + r * passes * per_pass
             + parts["final_decode"] * area)
    if recipe.candidates > 1:  # every candidate set is sampled whole and embedded once for the choice
        total = recipe.candidates * (total + feats)
    return total, notes


def check_estimate_args(gpu: str | None = None, img_per_s: float | None = None,
                        price_per_gpu_hour: float | None = None, mfu: float | None = None) -> None:
    """Reject bad planning options with a message naming the option (ValueError: the CLI's exit status 2)."""
    if gpu is not None and gpu.strip().lower() not in DEVICES:
        raise ValueError(f"--gpu: unknown GPU {gpu!r}; known: {', '.join(DEVICES)} "
                         "(for another device give its --img-per-s and --price-per-gpu-hour with any of them)")
    if img_per_s is not None and not (math.isfinite(img_per_s) and img_per_s > 0):
        raise ValueError(f"--img-per-s: must be a positive number of images per second per GPU, got {img_per_s}")
    if price_per_gpu_hour is not None and not (math.isfinite(price_per_gpu_hour) and price_per_gpu_hour >= 0):
        raise ValueError(f"--price-per-gpu-hour: must be a number >= 0 (USD), got {price_per_gpu_hour}")
    if mfu is not None and not (math.isfinite(mfu) and 0 < mfu <= 1):
        raise ValueError(f"--mfu: must be in (0, 1], got {mfu}")


def _measured(cfg, guidance: str, device: str):
    for backbone, checkpoint, g, dev, rate, source in MEASURED:
        if (backbone == cfg.backbone.name and checkpoint in ("*", cfg.backbone.checkpoint)
                and g in ("*", guidance) and dev == device):
            return rate, source
    return None


def estimate(cfg, gpu: str | None = None, img_per_s: float | None = None, price_per_gpu_hour: float | None = None,
             mfu: float | None = None, plan: Plan | None = None) -> dict:
    """Shards, images, device-hours and cost of a run of ``cfg`` on ``gpu`` (a key of DEVICES; default h100,
    or cpu when the config samples on CPUs), per recipe and in total, with where each rate comes from."""
    check_estimate_args(gpu, img_per_s, price_per_gpu_hour, mfu)
    device = gpu.strip().lower() if gpu is not None else ("h100" if cfg.executor.num_gpus > 0 else "cpu")
    desc, peak, on_demand, spot, unit = DEVICES[device]
    mfu_given, mfu = mfu, DEFAULT_MFU if mfu is None else mfu
    declared = declared_classes(cfg) is not None
    plan = plan if plan is not None else plan_for_config(cfg)
    n_classes = len(plan.labels)
    notes, rows = [], []
    for rp in plan.recipes:
        r = cfg.recipes[rp.recipe]
        g = guidance_key(r)
        steps, guided, passes = guided_schedule(cfg.sampling.steps, r)
        tflops, flop_notes = recipe_tflops(cfg, r)
        notes += [f"{rp.recipe}: {n}" for n in flop_notes]
        if img_per_s is not None:
            rate, kind, source = img_per_s, "given", "--img-per-s"
        elif (m := _measured(cfg, g, device)) is not None:
            (rate, source), kind = m, "measured"
        elif (tflops is not None and mfu_given is None and device in MEASURED_MFU_DEVICES
              and cfg.backbone.name in MEASURED_MFU):
            how = ("none" if g == "none" else "ot" if "ot" in g.split("+")
                   else cfg.backbone.options.get("guidance_decoder", "vae"))
            m_mfu = MEASURED_MFU[cfg.backbone.name].get(how, MEASURED_MFU[cfg.backbone.name]["vae"])
            rate, kind = peak * m_mfu / tflops, "measured-mfu"
            source = (f"{tflops:.4g} TFLOP/img at MFU {m_mfu:g} ({how} guidance, {MEASURED_MFU_DEVICES[device]}, "
                      f"factory bench --suite gpu, docs/benchmarks.md) of {peak:g} TFLOP/s")
        elif tflops is not None and peak is not None:
            rate, kind = peak * mfu / tflops, "estimate"
            source = (f"{tflops:.4g} TFLOP/img (factory bench FLOP counts, docs/benchmarks.md) at an assumed "
                      f"MFU of {mfu:.2f} of {peak:g} TFLOP/s")
        else:
            why = "no measured figure" + ("" if tflops is not None else f" and no FLOP model for {cfg.backbone.name!r}")
            raise ValueError(f"recipe {rp.recipe}: no images/s for backbone {cfg.backbone.name!r} "
                             f"(checkpoint {cfg.backbone.checkpoint!r}), guidance {g!r} on {device}: {why}; "
                             "pass --img-per-s")
        images = rp.images_per_class * n_classes
        rows.append({"recipe": rp.recipe, "images_per_class": rp.images_per_class,
                     "shards_per_class": rp.shards_per_class, "images": images,
                     "shards": rp.shards_per_class * n_classes, "guidance": g, "steps": steps, "guided_steps": guided,
                     "cfg_scale": r.cfg_scale, "tflops_per_img": None if tflops is None else round(tflops, 4),
                     "img_per_s": rate, "rate": kind, "rate_source": source, "device_hours": images / rate / 3600})
        if r.progressive_batch and r.progressive_batch < 8 and unit == "GPU":
            n_img = f"{r.progressive_batch} image" + ("s" if r.progressive_batch > 1 else "")
            notes.append(f"{rp.recipe}: samples sub-batches of {n_img} (greedy progressive matching), far below "
                         "a GPU's full-batch speed, which the estimate assumes: expect longer")
        low = [e for e in r.energies if e.name == "lowdensity" and e.params.beta > 0]
        if low:
            per = low[0].params.baseline_per_class
            notes.append(f"{rp.recipe}: each actor first samples {per} x {n_classes} unguided images to train the "
                         "low-density discriminator (not in the estimate)")
        if getattr(r, "finetune", None) is not None:
            notes.append(f"{rp.recipe}: fine-tuning before sampling is not in the estimate")
    hours = sum(x["device_hours"] for x in rows)
    if price_per_gpu_hour is not None:
        prices = {"given": price_per_gpu_hour}
    else:
        spot_price = spot if spot is not None else round(on_demand * (1 - SPOT_DISCOUNT), 4)
        prices = {"on_demand": on_demand, "spot": spot_price, "spot_assumed": spot is None}
    per_actor = cfg.executor.num_gpus if unit == "GPU" else cfg.executor.num_cpus
    if unit == "GPU" and cfg.executor.num_gpus <= 0:
        notes.append("executor.num_gpus is 0: this config samples on CPUs; the GPU figures assume "
                     "--set executor.num_gpus=1")
        per_actor = 1.0
    parallel = cfg.executor.num_actors[1] * per_actor
    # a shard is one actor's work: the pool never runs more shards at once than there are, and the run lasts
    # at least its longest shard
    busy = min(parallel, len(plan) * per_actor)
    longest = max((min(rp.shard_size, rp.images_per_class) / x["img_per_s"] / 3600 for rp, x in zip(plan.recipes, rows)),
                  default=0.0)
    for x in rows:
        x["cost"] = {k: x["device_hours"] * v for k, v in prices.items() if k != "spot_assumed"}
    return {
        "config": cfg.name, "classes": n_classes, "shards": len(plan), "images": plan.num_images,
        "sizes": "declared in the config, no data read" if declared else "counted from the real train split",
        "device": {"key": device, "name": desc, "unit": unit, "peak_tflops_bf16": peak},
        "mfu": mfu, "recipes": rows, "device_hours": hours, "prices": prices,
        "cost": {k: hours * v for k, v in prices.items() if k != "spot_assumed"},
        "parallel_devices": busy, "wall_hours": max(hours / busy, longest) if busy > 0 else None,
        "storage": storage_estimate(cfg, plan.num_images),
        "notes": notes + _tune_notes(cfg, plan) + [
            "excludes model loading, reading the real data, scoring, the report and downstream training"],
    }


def _tune_notes(cfg, plan: Plan) -> list[str]:
    """What each recipe's ``tune:`` pilot samples before the run (not in the hours above)."""
    out = []
    for rp in plan.recipes:
        r = cfg.recipes[rp.recipe]
        t = r.tune
        if t is not None:
            classes = min(t.pilot.classes, len(plan.labels))
            ipc = t.pilot.images_for(rp.images_per_class)
            n = len(t.grid())
            # a pilot run samples each of its candidate sets, and a trial of `candidates` sets its own count
            sets = sum(int(v) if t.param == "candidates" else r.candidates for v in t.grid())
            more = f" in {sets} candidate sets" if sets != n else ""
            out.append(f"{rp.recipe}: tune {t.param}: {n} pilot runs of {classes} classes x {ipc} images "
                       f"({sets * classes * ipc:,} images{more}, sampled like the recipe) before the run, "
                       "not in the hours above")
    return out


def _n(x: float) -> str:
    """A count or an amount for a table: thousands separated, 3 significant digits below 100."""
    if x >= 100 or float(x).is_integer():
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _money(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.2f}"


def _price(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.3g}"


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return "under a minute"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def format_estimate(est: dict) -> str:
    """The human-readable form of :func:`estimate`'s result."""
    unit = est["device"]["unit"]
    head = ["recipe", "img/class", "shards/class", "images", "shards", "guidance", "steps", "guided", "CFG",
            "TFLOP/img", f"img/s/{unit}", f"{unit}-hours"]
    rows = [[x["recipe"], _n(x["images_per_class"]), _n(x["shards_per_class"]), _n(x["images"]), _n(x["shards"]),
             x["guidance"], str(x["steps"]), str(x["guided_steps"]), f"{x['cfg_scale']:g}",
             "-" if x["tflops_per_img"] is None else f"{x['tflops_per_img']:.3g}", f"{x['img_per_s']:.3g}",
             _n(x["device_hours"])] for x in est["recipes"]]
    rows.append(["total", "", "", _n(est["images"]), _n(est["shards"]), "", "", "", "", "", "", _n(est["device_hours"])])
    width = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    left = {0, 5}
    table = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, width))).rstrip()
             for r in [head, *rows]]
    d = est["device"]
    peak = f", {d['peak_tflops_bf16']:g} TFLOP/s dense bf16" if d["peak_tflops_bf16"] else ""
    lines = [f"plan {est['config']}: {_n(est['classes'])} classes, {_n(est['shards'])} shards, "
             f"{_n(est['images'])} images (sizes {est['sizes']})", "", *table, "",
             f"device: {d['key']} ({d['name']}{peak})"]
    by_source: dict[tuple[str, str], list[str]] = {}
    for x in est["recipes"]:
        by_source.setdefault((x["rate"], x["rate_source"]), []).append(x["recipe"])
    for (kind, source), names in by_source.items():
        label = {"given": "given rate", "measured": "measured rate", "measured-mfu": "rate from measured MFU",
                 "estimate": "ESTIMATED rate, no measured figure"}[kind]
        lines.append(f"{', '.join(names)}: {label}: {source}")
    p = est["prices"]
    if "given" in p:
        lines.append(f"cost: ${_money(est['cost']['given'])} at ${_price(p['given'])}/{unit}-hour (given)")
    else:
        spot = "assumed 60% off on demand" if p["spot_assumed"] else "default"
        lines.append(f"cost: ${_money(est['cost']['on_demand'])} on demand at ${_price(p['on_demand'])}/{unit}-hour, "
                     f"${_money(est['cost']['spot'])} spot at ${_price(p['spot'])}/{unit}-hour ({spot}); default prices are "
                     "approximate list prices: --price-per-gpu-hour for yours")
    if est["wall_hours"] is not None:
        lines.append(f"wall: {_duration(est['wall_hours'])} of sampling on {_n(est['parallel_devices'])} {unit}s "
                     f"(executor.num_actors max x {unit}s per actor, at most one shard each)")
    st = est.get("storage")
    if st and st["bytes"] is not None:
        each = ", ".join(f"{_bytes(b)} in {f}" for f, b in st["per_format"].items())
        lines.append(f"storage: {_bytes(st['bytes'])}: {_n(est['images'])} images x {_bytes(st['bytes_per_image'])} "
                     f"({st['codec']}; per image {each}); {st['source']}")
    elif st:
        lines.append(f"storage: {st['source']}")
    lines += [f"note: {n}" for n in est["notes"]]
    return "\n".join(lines)
