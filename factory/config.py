"""Run configuration: pydantic models loaded from YAML and validated before any work starts.

Every section forbids unknown keys; choices are ``Literal``s, bounds are ``Field`` constraints, and each
energy's ``params`` (and each backbone's or feature space's ``options``) are typed by its ``name``. Every
error names the offending key by its dotted path (``recipes.chamfer.energies[0].params.k``) and says what
was expected. ``--set dotted.key=value`` overrides are applied to the raw YAML data before validation,
with values parsed as YAML scalars (``--set sampling.steps=10``, ``--set executor.num_actors=[1,4]``).
Models are strict (no ``"3"`` for an int, no ``1`` for a bool), except that a float field also takes a
number written as a string, as PyYAML reads ``1e-4``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import numpy as np
import yaml
from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError, ValidationInfo,
    field_validator, model_validator,
)
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the problem."""


def _number(value):
    """A float field's input: a number written as a string (PyYAML reads ``1e-4`` as one) becomes the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


Float = Annotated[float, BeforeValidator(_number)]
Backbone = Literal["tiny", "sd15", "sd35m", "dit-xl-2"]
FeatureSpace = Literal["cnn", "dinov2", "clip"]
Normalization = Literal["none", "l2", "linf", "latent", "set"]  # per image, or "set": one scale for the batch
Format = Literal["parquet", "webdataset"]
Codec = Literal["png", "jpeg", "webp"]
DataSource = Literal["digits", "fashion_mnist", "imagefolder", "parquet", "webdataset"]
Resnet = Literal["resnet18", "resnet34", "resnet50"]
Classifier = Literal["resnet18", "resnet34", "resnet50", "convnet"]
Dtype = Literal["fp32", "bf16", "fp16"]

BACKBONES, FEATURE_SPACES = get_args(Backbone), get_args(FeatureSpace)
ENERGIES = ("chamfer", "ot", "lowdensity")
NORMALIZATIONS, FORMATS, CODECS = get_args(Normalization), get_args(Format), get_args(Codec)
DATA_SOURCES, RESNETS = get_args(DataSource), get_args(Resnet)


def _error(message: str, at: str = "") -> PydanticCustomError:
    """A validator's error about the key ``at`` below the one it validates."""
    return PydanticCustomError("config", "{message}", {"message": message, "at": at})


class Section(BaseModel):
    """A mapping of the config: strict types, unknown keys rejected with the allowed ones named."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data):
        if isinstance(data, dict):
            unknown = sorted(map(str, set(data) - set(cls.model_fields)))
            if unknown:
                raise PydanticCustomError("unknown_key", "unknown key(s) {keys}", {
                    "keys": unknown, "allowed": ", ".join(sorted(cls.model_fields)) or "none"})
        return data


# ---------------------------------------------------------------------------------------------------------------
# backbone and feature-space options: checked here, handed to the loaders (factory/backbones.py) as a dict

def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _resolution(value):
    if value is None or _positive_int(value) or (isinstance(value, list) and len(value) == 2
                                                 and all(map(_positive_int, value))):
        return value
    raise ValueError(f"expected a positive integer or [height, width], got {value!r}")


def _checkpointing(value):
    parts = ("decoder", "denoiser")
    if value is None or isinstance(value, bool) or value in parts or (
            isinstance(value, list) and all(v in parts for v in value)):
        return value
    raise ValueError(f"expected true, false, or one or a list of {', '.join(parts)}, got {value!r}")


class TinyOptions(Section):
    lora: str | None = None  # a peft LoRA adapter (folder or URI) merged into the denoiser at load
    mode: Literal["L", "RGB"] | None = None  # ignored: the tiny UNet works in the real set's channels
    channels_last: bool | None = None  # NHWC convolutions; unset: true on tiny and on CUDA (load_backbone)


class LatentOptions(TinyOptions):
    device: str | None = None  # default cuda when available
    dtype: Dtype | None = None  # default bf16 on GPU, fp32 on CPU
    resolution: Annotated[int | list[int] | None, PlainValidator(_resolution)] = None
    gradient_checkpointing: Annotated[bool | str | list[str] | None, PlainValidator(_checkpointing)] = False
    guidance_decoder: Literal["vae", "tiny"] = "vae"  # the decoder on the guidance path
    fuse_projections: bool | None = None  # one QKV GEMM per attention, DiT's GELU in its GEMM; unset: on CUDA
    tiny_vae: str | None = None  # an AutoencoderTiny, for guidance_decoder tiny
    scheduler: Literal["ddim", "native"] = "ddim"
    variant: str | None = None
    class_names: list[str] | None = None
    compile: bool | dict[str, Any] = False  # torch.compile the denoiser and VAE decoders (kwargs: mode, backend, ...)


class SD15Options(LatentOptions):
    prompt_template: str = "a photo of a {class_name}"

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{class_name}" not in v:
            raise ValueError(f"must contain '{{class_name}}', got {v!r}")
        return v


class SD35Options(SD15Options):
    scheduler: Literal["native"] = "native"  # its flow-matching scheduler
    max_sequence_length: int = Field(256, ge=1)  # T5 tokens
    use_t5: bool | None = None  # default: when the checkpoint has it


class DiTOptions(LatentOptions):
    class_ids: list[Annotated[int, Field(ge=0)]] | None = None  # ImageNet id of each class


class NoOptions(Section):
    pass


class FeatureOptions(Section):
    device: str | None = None
    dtype: Dtype | None = None
    gradient_checkpointing: bool = False
    image_size: int | None = Field(None, ge=1)  # default the checkpoint's crop size
    variant: str | None = None
    compile: bool | dict[str, Any] = False  # torch.compile the model (kwargs: mode, backend, ...)


OPTIONS = {"tiny": TinyOptions, "sd15": SD15Options, "sd35m": SD35Options, "dit-xl-2": DiTOptions,
           "cnn": NoOptions, "dinov2": FeatureOptions, "clip": FeatureOptions}


class ModelConfig(Section):
    """A denoiser backbone: a kind, where its weights come from (packaged name, local folder or hub id) and
    its loader's options, checked against the kind's and kept as a dict of the keys given."""

    name: Backbone = "tiny"
    checkpoint: str = "digits"
    options: dict = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict, info: ValidationInfo) -> dict:
        if "name" not in info.data:  # the name's own error says it
            return v
        return OPTIONS[info.data["name"]].model_validate(v).model_dump(exclude_unset=True)


class FeaturesConfig(ModelConfig):
    """The feature space used for guidance and evaluation."""

    name: FeatureSpace = "cnn"


# ---------------------------------------------------------------------------------------------------------------
# data, sampling and guidance

class DataConfig(Section):
    source: DataSource = "digits"
    root: str | None = None  # folder or URI for imagefolder / parquet / webdataset
    classes: list[str] | None = None  # class names to produce; None = all
    # Declared sizes of the real set, for planning only: with them `factory plan` sizes a run without reading
    # the data (an ImageNet train split need not be read to plan a run). A run counts what it reads.
    num_classes: int | None = Field(None, ge=1)  # classes of the real set (all of them, not only data.classes)
    train_size: int | None = Field(None, ge=1)  # images in its train split (what a recipe's scale multiplies)
    image_size: int | None = Field(None, ge=1)  # side of its (square) images in px: the storage estimate's

    @model_validator(mode="after")
    def _classes_fit(self):
        if self.classes is not None and self.num_classes is not None and len(self.classes) > self.num_classes:
            raise _error(f"{len(self.classes)} classes listed, more than data.num_classes = {self.num_classes}",
                         "classes")
        return self


class SamplingConfig(Section):
    steps: int = Field(25, ge=1)
    shard_size: int = Field(135, ge=1)  # images per shard, of one class
    # images per sampling call where a recipe has no progressive_batch: None = the whole shard; "auto" = the
    # most that fit the actor's share of its GPU (probed once per recipe; the whole shard on a CPU)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None
    eta: Float = Field(0.0, ge=0)  # DDIM eta; 0 = deterministic given the initial noise


def _window(v: list[float]) -> list[float]:
    if len(v) != 2 or not 0.0 <= v[0] <= v[1] <= 1.0:
        raise ValueError(f"expected [start, end] fractions with 0 <= start <= end <= 1, got {v}")
    return v


class EnergyConfig(Section):
    """What every energy has; ``name`` picks the subclass, ``params`` its energy's own (factory/guidance)."""

    weight: Float = Field(1.0, ge=0)  # gamma: strength of this energy's gradient
    every: int = Field(1, ge=1)  # apply every N steps (G_freq)
    # active on step i of n while i / n is in [start, end]
    window: Annotated[list[Float], AfterValidator(_window)] = Field(default_factory=lambda: [0.0, 1.0])
    normalize: Normalization = "l2"


class ChamferParams(Section):
    k: int = Field(32, ge=1)  # real references per class
    coverage_weight: Float = Field(1.0, ge=0)
    fidelity_weight: Float = Field(1.0, ge=0)
    balance: bool = False  # fidelity x min(1, k / batch)
    # random: k real train features (the paper); kmeans: the class's k K-means centres, weighted by cluster mass
    references: Literal["random", "kmeans"] = "random"


def _cost_scale(value):
    value = _number(value)
    if value is None or value in ("mean", "max"):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    raise ValueError(f"expected a positive number, 'mean' or 'max', got {value!r}")


class OTParams(Section):
    K: int = Field(10, ge=1)  # K-means support points per class
    reg: Float = Field(0.1, gt=0)  # Sinkhorn epsilon, relative to the normalised cost
    num_iter: int = Field(5, ge=1)  # Sinkhorn iterations
    cost_scale: Annotated[float | str | None, PlainValidator(_cost_scale)] = None  # None: the class target's
    stop_thr: Float = Field(1e-12, ge=0)
    method: Literal["sinkhorn", "sinkhorn_log"] = "sinkhorn"
    plan_grad: Literal["autodiff", "envelope"] = "autodiff"


class LowDensityParams(Section):
    alpha: Float = Field(0.5, ge=0)  # hardness term
    beta: Float = Field(0.0, ge=0)  # discriminator term; > 0 trains a discriminator per recipe
    tau: Float = Field(1.0, gt=0)
    disc_tau: Float = Field(1.0, gt=0)
    identity_precision: bool = True  # False: each class's full covariance
    baseline_per_class: int = Field(64, ge=1)  # CFG samples per class the discriminator is trained against


class ChamferConfig(EnergyConfig):
    name: Literal["chamfer"]
    params: ChamferParams = Field(default_factory=ChamferParams)


class OTConfig(EnergyConfig):
    name: Literal["ot"]
    params: OTParams = Field(default_factory=OTParams)


class LowDensityConfig(EnergyConfig):
    name: Literal["lowdensity"]
    params: LowDensityParams = Field(default_factory=LowDensityParams)


Energy = Annotated[Union[ChamferConfig, OTConfig, LowDensityConfig], Field(discriminator="name")]


class SoftLabelsConfig(Section):
    """DMGD's dynamic soft labels (factory/guidance/softlabel.py); ``{}`` = the paper's."""

    explore_from: Float = Field(0.9, ge=0, le=1)  # random exploration while t_frac >= this
    refine_until: Float = Field(0.5, ge=0, le=1)  # the class's own embedding while t_frac <= this
    beta_s: Float = Field(0.01, ge=0)
    beta_n: Float = Field(0.06, ge=0)
    schedule: Literal["linear", "cosine"] = "linear"
    baseline: Literal["zero", "unconditional"] = "zero"  # what the diffused label decays to
    # where the label is softened: the paper interpolates the embedding; "output" mixes the two conditions'
    # denoiser outputs (one more pass in the soft stage) and keeps the model on embeddings it was trained on
    mix: Literal["embedding", "output"] = "embedding"

    @model_validator(mode="after")
    def _stages(self):
        if not self.refine_until < self.explore_from:
            raise _error(f"must be below explore_from ({self.explore_from}), got {self.refine_until}", "refine_until")
        return self


class FinetuneConfig(Section):
    """Real-Fake (paper 002): LoRA fine-tuning of the denoiser on the train split, on Ray Train, before a
    recipe's shards are made; loss L_simple + mmd_weight * L_MMD (Eq. 21). See factory/realfake.py."""

    rank: int = Field(4, ge=1)  # LoRA rank
    alpha: Float | None = Field(None, gt=0)  # LoRA alpha; None = rank (scale 1)
    target_modules: list[str] | None = None  # None = the attention projections (the ResNet convs if none)
    mmd_weight: Float = Field(0.05, ge=0)  # gamma
    steps: int = Field(200, ge=1)  # optimizer steps
    lr: Float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=2)  # images per worker and step; the MMD compares sets
    p_uncond: Float = Field(0.1, ge=0, lt=1)  # condition dropped to the null condition, so CFG keeps working
    num_workers: int = Field(2, ge=1)  # Ray Train workers
    use_gpu: bool = False
    checkpoint_every: int = Field(50, ge=1)  # steps between Ray Train checkpoints (resume points)


TUNE_OBJECTIVES = {"f1_pc": "max", "coverage": "max", "precision": "max", "fd": "min", "label_agreement": "max",
                   "downstream": "max"}  # -> mode


class PilotConfig(Section):
    """The small run each trial of a ``tune:`` makes: a few classes, scored against a validation split carved
    from the train split (never the test split)."""

    classes: int = Field(10, ge=1)  # a seeded pick of the plan's classes (all when fewer)
    images_per_class: int | None = Field(None, ge=2)  # None: the recipe's own, at most 50
    validation_per_class: int = Field(30, ge=2)  # train images per class held out as the pilot's test split
    references_per_class: int = Field(200, ge=1)  # at most this many of the rest are the pilot's train split
    concurrent: int = Field(1, ge=1)  # trials at once (each runs its own pilot on the cluster)

    def images_for(self, recipe_images_per_class: int) -> int:
        return self.images_per_class or min(recipe_images_per_class, 50)


class TuneConfig(Section):
    """One parameter of the recipe chosen by a Ray Tune grid over pilot runs (factory/stages/tune.py)."""

    param: str  # dotted path inside the recipe: energies.0.weight, cfg_scale, energies.0.params.k
    values: list[Float | int] | None = None  # the grid; or range + trials (+ log)
    range: list[Float] | None = None  # [low, high]
    trials: int = Field(5, ge=2)  # points of range, ends included
    log: bool = True  # geometric spacing of range
    objective: Literal[tuple(TUNE_OBJECTIVES)] = "f1_pc"  # one of TUNE_OBJECTIVES' keys
    pilot: PilotConfig = Field(default_factory=PilotConfig)

    @model_validator(mode="after")
    def _grid(self):
        if (self.values is None) == (self.range is None):
            raise _error("give either values (a list) or range ([low, high]) and trials", "values")
        if self.values is not None and len(self.values) < 2:
            raise _error(f"at least two values are needed to choose from, got {self.values}", "values")
        if self.range is not None:
            low_high = self.range
            if len(low_high) != 2 or not low_high[0] < low_high[1] or (self.log and low_high[0] <= 0):
                raise _error(f"expected [low, high] with low < high{' and low > 0 (log: true)' if self.log else ''}"
                             f", got {low_high}", "range")
        return self

    def grid(self) -> list:
        """The values the trials try, in order (a range's rounded to 4 significant digits)."""
        if self.values is not None:
            return list(self.values)
        space = np.geomspace if self.log else np.linspace
        return [float(f"{v:.4g}") for v in space(self.range[0], self.range[1], self.trials)]


def get_dotted(data, dotted: str):
    """``data`` at ``a.0.b`` (mapping keys and list indices)."""
    for key in dotted.split("."):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def set_dotted(data, dotted: str, value) -> None:
    """Set ``a.0.b`` in nested mappings and lists (which must exist up to the last key)."""
    *path, last = dotted.split(".")
    node = get_dotted(data, ".".join(path)) if path else data
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


class RecipeConfig(Section):
    cfg_scale: Float = 2.0  # omega >= 1; 1.0 = CFG-free (no unconditional pass)
    scale: Float = Field(1.0, gt=0)  # images per class = ceil(scale * train size / classes)
    images_per_class: int | None = Field(None, ge=1)  # overrides scale when set
    energies: list[Energy] = Field(default_factory=list)
    soft_labels: SoftLabelsConfig | None = None  # DMGD dynamic soft labels; None = off
    progressive_batch: int = Field(0, ge=0)  # greedy progressive matching: sub-batch size within a shard; 0 = off
    init_strength: Float = Field(1.0, gt=0, le=1)  # < 1: latent prior, a real train image noised to this strength
    grad_through: Literal["model", "x0"] = "model"  # backpropagate through the denoiser, or x̂₀ only
    recurrence: int = Field(1, ge=1)  # > 1: each guided step repeated, re-noised between (self-recurrence)
    candidates: int = Field(1, ge=1)  # > 1: sample this many sets a shard, keep the images its energy prefers
    finetune: FinetuneConfig | None = None  # Real-Fake LoRA fine-tuning before sampling; None = off
    tune: TuneConfig | None = None  # choose one parameter by a pilot on a validation carve; None = as written

    @field_validator("cfg_scale")
    @classmethod
    def _cfg_scale(cls, v: float) -> float:
        # below 1 the CFG formula u + w (c - u) extrapolates away from the class, where diffusers' pipelines
        # read any w <= 1 as "no CFG": rejected rather than silently meaning either
        if v < 1.0:
            raise ValueError("must be >= 1.0 (1.0 = no CFG; a scale below 1 would extrapolate away from the "
                             f"class, not disable CFG), got {v}")
        return v

    @model_validator(mode="after")
    def _selection(self):
        names = [e.name for e in self.energies]
        if self.candidates > 1 and (len(names) != 1 or names[0] not in ("chamfer", "ot")):
            raise _error(f"candidates: {self.candidates} chooses images by the recipe's energy: it needs exactly "
                         f"one energy, chamfer or ot (it has {names or 'none'})", "candidates")
        return self

    @model_validator(mode="after")
    def _tunable(self):
        """Every value of the grid, put at ``tune.param``, must make a valid recipe (checked here, not by a trial)."""
        if self.tune is None:
            return self
        data = self.model_dump(exclude={"tune"})
        try:
            get_dotted(data, self.tune.param)
        except (KeyError, IndexError, ValueError, TypeError):
            raise _error(f"{self.tune.param!r} is not a parameter of this recipe (e.g. cfg_scale, "
                         "energies.0.weight, energies.0.params.k)", "tune.param") from None
        if self.tune.param.split(".")[0] in ("tune", "finetune", "images_per_class", "scale"):
            raise _error(f"{self.tune.param!r} cannot be tuned: it is not a sampling strength", "tune.param")
        for value in self.tune.grid():
            trial = self.model_dump(exclude={"tune"})
            set_dotted(trial, self.tune.param, value)
            try:
                RecipeConfig.model_validate(trial)
            except ValidationError as e:
                first = e.errors()[0]
                raise _error(f"value {value!r} at {self.tune.param}: {_message(first)}", "tune.values") from None
        return self


# ---------------------------------------------------------------------------------------------------------------
# execution, output, evaluation

def _actors(v: list[int]) -> list[int]:
    if len(v) != 2 or not 1 <= v[0] <= v[1]:
        raise ValueError(f"expected [min, max] with 1 <= min <= max, got {v}")
    return v


class ExecutorConfig(Section):
    num_actors: Annotated[list[int], AfterValidator(_actors)] = Field(default_factory=lambda: [1, 2])  # [min, max]
    num_cpus: Float = Field(1.0, ge=0)  # per actor
    num_gpus: Float = Field(0.0, ge=0)  # per actor
    torch_threads: int = Field(1, ge=1)  # per actor; fixed so a shard's bytes do not depend on the host
    address: str | None = None  # Ray cluster address; None = RAY_ADDRESS or a local Ray


class OutputConfig(Section):
    formats: list[Format] = Field(default_factory=lambda: ["parquet", "webdataset"])
    codec: Codec = "png"  # how each image is encoded
    quality: int = Field(90, ge=1, le=100)  # for jpeg and webp (png is lossless and ignores it)

    @field_validator("formats")
    @classmethod
    def _some(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one format is needed")
        return v


class EvalConfig(Section):
    k: int = Field(5, ge=1)  # PRDC neighbourhood size


class DownstreamConfig(Section):
    """Downstream classifier training on Ray Train, evaluated on the real test split."""

    enabled: bool = False
    model: Classifier = "resnet18"  # convnet: the dataset-distillation benchmark's ConvNet (instance norm)
    epochs: int = Field(10, ge=1)
    # reports and checkpoints per classifier, evenly over its epochs (and at the last): each costs Ray Train
    # ~1 s; fewer lose more epochs to a preemption
    checkpoints: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: Float = Field(0.05, gt=0)
    num_workers: int = Field(2, ge=1)  # Ray Train workers
    # data: every worker trains every classifier on its share of the rows (DDP), for large sets;
    # runs: each worker trains whole classifiers, dealt out, for many small sets (no gradient traffic)
    parallel: Literal["data", "runs"] = "data"
    use_gpu: bool = False
    train_on: list[Literal["synthetic", "real", "mixed"]] = Field(default_factory=lambda: ["synthetic"])
    # the distillation protocol (issue 12): each classifier trained with seeds seed .. seed + seeds - 1, reported
    # as mean and std; random_real adds the row every small synthetic set must beat, a seeded random subset of
    # the real train split with the recipes' images per class
    seeds: int = Field(1, ge=1)
    random_real: bool = False
    augment: Literal["crop", "resized_crop"] = "crop"  # padded random crop, or random-resized crop (scale 0.5-1)
    flip: bool = False  # random horizontal flips (not for digits or text)
    cutmix: float = Field(0.0, ge=0, le=1)  # probability of CutMix on a batch (hard labels mixed by area)


class Config(Section):
    name: str = "run"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: ModelConfig = Field(default_factory=ModelConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)
    recipes: dict[str, RecipeConfig] = Field(default_factory=lambda: {"cfg": RecipeConfig()})

    @field_validator("recipes", mode="before")
    @classmethod
    def _names_as_strings(cls, v):
        return {str(k): r for k, r in v.items()} if isinstance(v, dict) else v

    @field_validator("recipes")
    @classmethod
    def _recipe_names(cls, v: dict) -> dict:
        if not v:
            raise ValueError("at least one recipe is needed")
        for name in v:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise _error("recipe names may hold letters, digits, '-' and '_' only", name)
        return v

    def to_dict(self) -> dict:
        return self.model_dump()


# ---------------------------------------------------------------------------------------------------------------
# loading

_EXPECTED = {"int_type": "an integer", "float_type": "a finite number", "finite_number": "a finite number",
             "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
             "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping"}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _path(loc: tuple) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i >= 2 and loc[i - 2] == "energies" and isinstance(loc[i - 1], int):
            continue  # the energy union's tag (its name)
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(err: dict) -> str:
    """One pydantic error as ``dotted.path: what is wrong``."""
    path, kind, ctx, got = _path(err["loc"]), err["type"], err.get("ctx", {}), err.get("input")
    if kind == "unknown_key":
        keys = ", ".join(f"{path + '.' if path else ''}{key!r}" for key in ctx["keys"])
        return f"unknown key{'s' if len(ctx['keys']) > 1 else ''} {keys}; allowed keys: {ctx['allowed']}"
    if kind == "config":
        path = ".".join(p for p in (path, ctx["at"]) if p)
        return f"{path}: {ctx['message']}"
    if kind == "missing":
        *parent, key = err["loc"]
        return f"{_path(tuple(parent)) or 'config'}: missing required key {key!r}"
    if kind == "union_tag_not_found":
        return f"{path}: missing required key {ctx['discriminator']}"
    if kind == "union_tag_invalid":
        return (f"{path}.{ctx['discriminator'].strip(chr(39))}: unknown value {ctx['tag']!r}; "
                f"expected one of {ctx['expected_tags']}")
    if kind == "literal_error":
        return f"{path}: unknown value {got!r}; expected one of {ctx['expected']}"
    if kind in _BOUNDS:
        (bound,) = ctx.values()
        return f"{path}: must be {_BOUNDS[kind]} {bound}, got {got!r}"
    if kind in _EXPECTED:
        return f"{path or 'config'}: expected {_EXPECTED[kind]}, got {got!r}"
    if kind == "value_error":
        return f"{path}: {ctx['error']}"
    return f"{path}: {err['msg']}"


def _index(node: list, key: str, dotted: str) -> int:
    try:
        i = int(key)
    except ValueError:
        raise ConfigError(f"--set {dotted}: {key!r} is not an index (that part of the config is a list)") from None
    if not -len(node) <= i < len(node):
        raise ConfigError(f"--set {dotted}: index {i} is out of range (the list there has {len(node)} items)")
    return i


def _set_dotted(data: dict, dotted: str, value, keys: list[str] | None = None) -> None:
    """Set ``dotted`` (``a.b.c``) in ``data``; a number indexes a list (``recipes.x.energies.0.weight``), a ``*``
    stands for every key of the mapping (or item of the list) there, as in ``recipes.*.images_per_class=50``.
    Every mapping and list on the path is copied before it is changed: YAML anchors (``<<: *chamfer``) share
    them between recipes, and an override of one recipe must not reach another (nor the caller's data)."""
    keys = dotted.split(".") if keys is None else keys
    node = data
    for i, k in enumerate(keys[:-1]):
        if k == "*":
            children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
            if not children:
                raise ConfigError(f"--set {dotted}: '*' matches nothing (an empty {type(node).__name__})")
            for name, child in children:
                if not isinstance(child, (dict, list)):
                    raise ConfigError(f"--set {dotted}: {name!r} is not a mapping")
                node[name] = copy = dict(child) if isinstance(child, dict) else list(child)
                _set_dotted(copy, dotted, value, keys[i + 1:])
            return
        if isinstance(node, list):
            k = _index(node, k, dotted)
        elif node.get(k) is None:
            node[k] = {}
        child = node[k]
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"--set {dotted}: {keys[i]!r} is not a mapping")
        node[k] = node = dict(child) if isinstance(child, dict) else list(child)
    node[_index(node, keys[-1], dotted) if isinstance(node, list) else keys[-1]] = value


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
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError("\n".join(dict.fromkeys(_message(err) for err in e.errors()))) from None


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
