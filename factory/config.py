"""Run configuration: plain dataclasses loaded from YAML and validated before any work starts.

Every error names the offending key by its dotted path (``recipes.chamfer.energies[0].k``) and says what
was expected. ``--set dotted.key=value`` overrides are applied to the raw YAML data before validation,
with values parsed as YAML scalars (``--set sampling.steps=10``, ``--set executor.num_actors=[1,4]``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the problem."""


@dataclass
class DataConfig:
    source: str = "digits"  # digits | fashion_mnist | imagefolder | parquet | webdataset
    root: str | None = None  # folder or URI for imagefolder / parquet / webdataset
    classes: list[str] | None = None  # class names to produce; None = all
    # Declared sizes of the real set, for planning only: with them `factory plan` sizes a run without reading
    # the data (an ImageNet train split need not be read to plan a run). A run counts what it reads.
    num_classes: int | None = None  # classes of the real set (all of them, not only data.classes)
    train_size: int | None = None  # images in its train split (what a recipe's scale multiplies)
    image_size: int | None = None  # side of its (square) images in px: the storage estimate's resolution


@dataclass
class ModelConfig:
    """A denoiser backbone or a feature space: a kind and where its weights come from."""

    name: str = "tiny"
    checkpoint: str = "digits"  # packaged name, local folder or hub id
    options: dict = field(default_factory=dict)  # loader-specific (dtype, prompt template, adapter, ...)


@dataclass
class FeaturesConfig(ModelConfig):
    """The feature space used for guidance and evaluation."""

    name: str = "cnn"


@dataclass
class SamplingConfig:
    steps: int = 25
    shard_size: int = 135  # images per shard: one shard is one sampling batch of one class
    eta: float = 0.0  # DDIM eta; 0 = deterministic given the initial noise


@dataclass
class EnergyConfig:
    name: str  # chamfer | ot | lowdensity
    weight: float = 1.0  # gamma: strength of this energy's gradient
    every: int = 1  # apply every N steps (G_freq)
    window: list[float] = field(default_factory=lambda: [0.0, 1.0])  # active while step/steps is in [a, b]
    normalize: str = "l2"  # none | l2 | linf | latent (per image) | set (one scale for the batch)
    params: dict = field(default_factory=dict)  # energy-specific (k, K, reg, alpha, beta, ...)


@dataclass
class FinetuneConfig:
    """Real-Fake (paper 002): LoRA fine-tuning of the denoiser on the train split, on Ray Train, before a
    recipe's shards are made; loss L_simple + mmd_weight * L_MMD (Eq. 21). See factory/realfake.py."""

    rank: int = 4  # LoRA rank
    alpha: float | None = None  # LoRA alpha; None = rank (scale 1)
    target_modules: list[str] | None = None  # None = the attention projections (the ResNet convs if none)
    mmd_weight: float = 0.05  # gamma
    steps: int = 200  # optimizer steps
    lr: float = 1e-4
    batch_size: int = 32  # images per worker and step
    p_uncond: float = 0.1  # condition dropped to the null condition, so CFG keeps working
    num_workers: int = 2  # Ray Train workers
    use_gpu: bool = False
    checkpoint_every: int = 50  # steps between Ray Train checkpoints (resume points)


@dataclass
class RecipeConfig:
    cfg_scale: float = 2.0  # omega >= 1; 1.0 = CFG-free (no unconditional pass); < 1 is rejected
    scale: float = 1.0  # images per class = ceil(scale * train size / classes)
    images_per_class: int | None = None  # overrides scale when set
    energies: list[EnergyConfig] = field(default_factory=list)
    soft_labels: dict | None = None  # DMGD dynamic soft labels; {} = the paper's defaults
    progressive_batch: int = 0  # greedy progressive matching: sub-batch size within a shard; 0 = off
    init_strength: float = 1.0  # < 1: latent prior, a real train image of the class noised to this strength
    grad_through: str = "model"  # model | x0: backpropagate through the denoiser, or x̂₀ only
    finetune: FinetuneConfig | None = None  # Real-Fake LoRA fine-tuning before sampling; None = off


@dataclass
class ExecutorConfig:
    num_actors: list[int] = field(default_factory=lambda: [1, 2])  # actor pool (min, max)
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor
    torch_threads: int = 1  # per actor; fixed so a shard's bytes do not depend on the host
    address: str | None = None  # Ray cluster address; None = RAY_ADDRESS or a local Ray


@dataclass
class OutputConfig:
    formats: list[str] = field(default_factory=lambda: ["parquet", "webdataset"])
    codec: str = "png"  # png | jpeg | webp: how each image is encoded
    quality: int = 90  # 1-100, for jpeg and webp (png is lossless and ignores it)


@dataclass
class EvalConfig:
    k: int = 5  # PRDC neighbourhood size


@dataclass
class DownstreamConfig:
    """Downstream classifier training on Ray Train, evaluated on the real test split."""

    enabled: bool = False
    model: str = "resnet18"  # a torchvision ResNet
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    num_workers: int = 2  # Ray Train workers
    use_gpu: bool = False
    train_on: list[str] = field(default_factory=lambda: ["synthetic"])  # synthetic | real | mixed


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    backbone: ModelConfig = field(default_factory=ModelConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    recipes: dict[str, RecipeConfig] = field(default_factory=lambda: {"cfg": RecipeConfig()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


BACKBONES = ("tiny", "sd15", "sd35m", "dit-xl-2")
FEATURE_SPACES = ("cnn", "dinov2", "clip")
ENERGIES = ("chamfer", "ot", "lowdensity")
NORMALIZATIONS = ("none", "l2", "linf", "latent", "set")
FORMATS = ("parquet", "webdataset")
CODECS = ("png", "jpeg", "webp")
DATA_SOURCES = ("digits", "fashion_mnist", "imagefolder", "parquet", "webdataset")


def _convert(value, tp, path: str):
    """Check ``value`` against the type annotation ``tp`` and build dataclasses; raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(value).__name__} {value!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - names)
        if unknown:
            where = f"{path}." if path else ""
            raise ConfigError(f"unknown key {where}{unknown[0]!r}; allowed keys: {', '.join(sorted(names))}")
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _convert(value[f.name], hints[f.name], f"{path}.{f.name}" if path else f.name)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}: missing required key {f.name!r}")
        return tp(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")


def _one_of(value, allowed, path):
    if value not in allowed:
        raise ConfigError(f"{path}: unknown value {value!r}; expected one of {', '.join(allowed)}")


def _check(cfg: Config) -> None:
    _one_of(cfg.data.source, DATA_SOURCES, "data.source")
    _one_of(cfg.backbone.name, BACKBONES, "backbone.name")
    _one_of(cfg.features.name, FEATURE_SPACES, "features.name")
    for key in ("num_classes", "train_size", "image_size"):
        if getattr(cfg.data, key) is not None and getattr(cfg.data, key) < 1:
            raise ConfigError(f"data.{key}: must be >= 1, got {getattr(cfg.data, key)}")
    if cfg.data.classes is not None and cfg.data.num_classes is not None and len(cfg.data.classes) > cfg.data.num_classes:
        raise ConfigError(f"data.classes: {len(cfg.data.classes)} classes listed, more than "
                          f"data.num_classes = {cfg.data.num_classes}")
    if cfg.sampling.steps < 1:
        raise ConfigError(f"sampling.steps: must be >= 1, got {cfg.sampling.steps}")
    if cfg.sampling.shard_size < 1:
        raise ConfigError(f"sampling.shard_size: must be >= 1, got {cfg.sampling.shard_size}")
    lo_hi = cfg.executor.num_actors
    if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
        raise ConfigError(f"executor.num_actors: expected [min, max] with 1 <= min <= max, got {lo_hi}")
    if cfg.executor.torch_threads < 1:
        raise ConfigError("executor.torch_threads: must be >= 1")
    if not cfg.output.formats:
        raise ConfigError("output.formats: at least one format is needed")
    for i, f in enumerate(cfg.output.formats):
        _one_of(f, FORMATS, f"output.formats[{i}]")
    _one_of(cfg.output.codec, CODECS, "output.codec")
    if not 1 <= cfg.output.quality <= 100:
        raise ConfigError(f"output.quality: must be in 1..100, got {cfg.output.quality}")
    for i, mode in enumerate(cfg.downstream.train_on):
        _one_of(mode, ("synthetic", "real", "mixed"), f"downstream.train_on[{i}]")
    if cfg.downstream.epochs < 1 or cfg.downstream.num_workers < 1 or cfg.downstream.batch_size < 1:
        raise ConfigError("downstream: epochs, batch_size and num_workers must be >= 1")
    if cfg.eval.k < 1:
        raise ConfigError("eval.k: must be >= 1")
    if not cfg.recipes:
        raise ConfigError("recipes: at least one recipe is needed")
    for rname, r in cfg.recipes.items():
        p = f"recipes.{rname}"
        if not rname.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{p}: recipe names may hold letters, digits, '-' and '_' only")
        if r.cfg_scale < 1.0:
            # below 1 the CFG formula u + w (c - u) extrapolates away from the class, where diffusers'
            # pipelines read any w <= 1 as "no CFG": rejected rather than silently meaning either
            raise ConfigError(f"{p}.cfg_scale: must be >= 1.0 (1.0 = no CFG; a scale below 1 would "
                              f"extrapolate away from the class, not disable CFG), got {r.cfg_scale}")
        if r.scale <= 0:
            raise ConfigError(f"{p}.scale: must be > 0, got {r.scale}")
        if r.images_per_class is not None and r.images_per_class < 1:
            raise ConfigError(f"{p}.images_per_class: must be >= 1")
        if r.progressive_batch < 0:
            raise ConfigError(f"{p}.progressive_batch: must be >= 0 (0 = off)")
        if not 0.0 < r.init_strength <= 1.0:
            raise ConfigError(f"{p}.init_strength: must be in (0, 1], got {r.init_strength}")
        _one_of(r.grad_through, ("model", "x0"), f"{p}.grad_through")
        ft = r.finetune
        if ft is not None:
            for key in ("rank", "steps", "num_workers", "checkpoint_every"):
                if getattr(ft, key) < 1:
                    raise ConfigError(f"{p}.finetune.{key}: must be >= 1, got {getattr(ft, key)}")
            if ft.batch_size < 2:
                raise ConfigError(f"{p}.finetune.batch_size: must be >= 2 (the MMD compares sets), got {ft.batch_size}")
            if ft.lr <= 0 or ft.mmd_weight < 0 or not 0.0 <= ft.p_uncond < 1.0:
                raise ConfigError(f"{p}.finetune: lr must be > 0, mmd_weight >= 0 and p_uncond in [0, 1)")
        if r.soft_labels is not None:
            allowed = {"explore_from", "refine_until", "beta_s", "beta_n", "schedule", "baseline"}
            for k in r.soft_labels:
                if k not in allowed:
                    raise ConfigError(f"unknown key {p}.soft_labels.{k!r}; allowed keys: {', '.join(sorted(allowed))}")
            if "baseline" in r.soft_labels:
                _one_of(r.soft_labels["baseline"], ("zero", "unconditional"), f"{p}.soft_labels.baseline")
        for i, e in enumerate(r.energies):
            ep = f"{p}.energies[{i}]"
            _one_of(e.name, ENERGIES, f"{ep}.name")
            _one_of(e.normalize, NORMALIZATIONS, f"{ep}.normalize")
            if e.every < 1:
                raise ConfigError(f"{ep}.every: must be >= 1")
            if len(e.window) != 2 or not 0.0 <= e.window[0] <= e.window[1] <= 1.0:
                raise ConfigError(f"{ep}.window: expected [start, end] fractions with 0 <= start <= end <= 1")


def _set_dotted(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {} if node.get(k) is None else node[k]
            if not isinstance(node[k], dict):
                raise ConfigError(f"--set {dotted}: {k!r} is not a mapping")
        node = node[k]
    node[keys[-1]] = value


def parse_overrides(items: list[str] | None) -> list[tuple[str, object]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw)))
    return out


def from_dict(data: dict | None, overrides: list[tuple[str, object]] = ()) -> Config:
    data = dict(data or {})
    for key, value in overrides:
        _set_dotted(data, key, value)
    cfg = _convert(data, Config, "")
    _check(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    cfg = from_dict(data, parse_overrides(overrides))
    if "name" not in (data or {}):
        cfg.name = path.stem
    return cfg
