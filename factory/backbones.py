"""Denoiser backbones and feature spaces behind the sampler's small interface (``factory.sampler.Backbone``).

A backbone conditions by embedding tensors, not ids, so that DMGD's soft labels can interpolate them. Every
method takes and returns tensors on the caller's device and dtype and computes on ``backbone.device`` in
``backbone.dtype``; ``decode`` returns float32 pixels in [-1, 1] at ``real_size`` (and the real set's mode).
Backbones (``load_backbone``): ``tiny``, ``sd15``, ``sd35m``, ``dit-xl-2``; feature spaces (``load_features``):
``cnn``, ``dinov2``, ``clip``. Their options and conventions (SD3's packed condition, DiT's shared label
table, the tiny guidance decoder) are in docs/backbones.md.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from factory import embedded

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_TEMPLATE = "a photo of a {class_name}"
DEFAULT_FEATURE_CHECKPOINTS = {"dinov2": "facebook/dinov2-large", "clip": "openai/clip-vit-large-patch14"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


class _EmbeddingPassThrough(nn.Module):
    """Wraps a class ``nn.Embedding``: integer ids are looked up, float tensors are used as embeddings."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x if x.is_floating_point() else self.embedding(x, *args, **kwargs)


class TinyBackbone:
    latent = False

    def __init__(self, unet, scheduler, real_size: tuple[int, int]):
        self.unet = unet.eval().requires_grad_(False)
        self.run_denoiser = self.unet  # what predict calls; see wrap_denoiser
        if not isinstance(unet.class_embedding, _EmbeddingPassThrough):
            unet.class_embedding = _EmbeddingPassThrough(unet.class_embedding)
        self.scheduler = scheduler
        self.real_size = tuple(real_size)
        self.sample_size = unet.config.sample_size
        self.null_id = unet.config.num_class_embeds - 1
        self.device = next(unet.parameters()).device
        self.dtype = torch.float32

    @property
    def num_classes(self) -> int:
        return self.null_id

    def noise_shape(self, batch: int) -> tuple[int, ...]:
        s = self.sample_size
        s = (s, s) if isinstance(s, int) else tuple(s)
        return (batch, self.unet.config.in_channels, *s)

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        return self.unet.class_embedding.embedding(labels.long())

    def null_condition(self, batch: int) -> torch.Tensor:
        return self.condition(torch.full((batch,), self.null_id, dtype=torch.long))

    def predict(self, x: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        return self.run_denoiser(x, t, class_labels=cond).sample

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return embedded.to_real_size(x0, self.real_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return embedded.to_model_space(images, self.sample_size)

    def modules(self) -> dict[str, nn.Module]:
        return {"denoiser": self.unet}

    def wrap_denoiser(self, wrapper: nn.Module) -> None:
        """Run predict's forward through ``wrapper`` (Ray Train's DDP around the denoiser: its gradient hooks
        fire only on calls through it); everything else still reads the module itself."""
        self.run_denoiser = wrapper


# ----------------------------------------------------------------------------- helpers


def resolve_device(device=None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move to ``device`` and cast floating parameters to ``dtype`` only where needed; frozen, eval mode.

    (diffusers' ``ModelMixin.to`` warns whenever a dtype is passed, even when nothing changes.)
    """
    module = module.to(device)
    if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


def _hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _checkpoint_parts(value, allowed: tuple[str, ...], default: tuple[str, ...]) -> set[str]:
    """``gradient_checkpointing``: false, true (= ``default``) or a list of part names."""
    if value is None or value is False:
        return set()
    if value is True:
        return set(default)
    parts = {value} if isinstance(value, str) else set(value)
    unknown = parts - set(allowed)
    if unknown:
        raise ValueError(f"gradient_checkpointing: unknown part(s) {sorted(unknown)}; allowed: {', '.join(allowed)}")
    return parts


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, 1|3|4, H, W) -> (B, 3, H, W): grey is repeated, an alpha channel dropped."""
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 4:
        return x[:, :3]
    if x.shape[1] != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {x.shape[1]}")
    return x


def to_mode(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    """RGB pixels -> the real set's mode: "L" takes the luma (affine, so [-1, 1] stays [-1, 1])."""
    if mode in (None, "RGB"):
        return x
    if mode == "L":
        if x.shape[1] == 1:
            return x
        w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x[:, :3] * w).sum(1, keepdim=True)
    raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")


def _checkpointed_layers(layers) -> None:
    """Activation checkpointing of transformers layers that also works in eval mode."""
    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        fwd = layer.forward

        def wrapped(*args, _fwd=fwd, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_fwd, *args, use_reentrant=False, **kwargs)
            return _fwd(*args, **kwargs)

        layer.forward = wrapped


def _is_local(checkpoint) -> bool:
    return Path(str(checkpoint)).expanduser().is_dir()


def _has_part(checkpoint, part: str) -> bool | None:
    """Whether a local pipeline folder has ``part/``; None for hub ids (unknown)."""
    if _is_local(checkpoint):
        return (Path(str(checkpoint)).expanduser() / part).is_dir()
    return None


def _path(checkpoint) -> str:
    return str(Path(str(checkpoint)).expanduser()) if _is_local(checkpoint) else str(checkpoint)


def _load_scheduler(checkpoint, kind: str):
    import diffusers

    folder = _path(checkpoint)
    config = diffusers.DDIMScheduler.load_config(folder, subfolder="scheduler")
    if kind == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    if kind == "native":
        return getattr(diffusers, config["_class_name"]).from_config(config)
    raise ValueError(f"scheduler must be 'ddim' or 'native', got {kind!r}")


def _load_tiny_vae(where):
    from diffusers import AutoencoderTiny

    if not where:
        raise ValueError("guidance_decoder 'tiny' needs the option tiny_vae (a folder or hub id of an AutoencoderTiny)")
    path = _path(where)
    if _is_local(where) and not (Path(path) / "config.json").is_file() and (Path(path) / "vae").is_dir():
        return AutoencoderTiny.from_pretrained(path, subfolder="vae")
    return AutoencoderTiny.from_pretrained(path)


# ----------------------------------------------------------------------------- latent backbones


class LatentBackbone:
    """What the latent backbones share: VAE decode/encode, devices and dtypes, the guidance decoder."""

    latent = True

    def __init__(self, denoiser: nn.Module, vae: nn.Module, scheduler, real_size, *, mode: str | None = None,
                 resolution=None, device=None, dtype=None, gradient_checkpointing=False,
                 guidance_decoder: str = "vae", tiny_vae: nn.Module | None = None):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if len(real_size) == 3:  # (C, H, W)
            c, *real_size = real_size
            mode = mode or ("L" if c == 1 else "RGB")
        if mode not in (None, "L", "RGB"):
            raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
        self.real_size = _hw(real_size)
        self.mode = mode
        self.scheduler = scheduler
        self.denoiser = place(denoiser, self.device, self.dtype)
        self.run_denoiser = self.denoiser  # what _forward calls; see wrap_denoiser
        # fp16 VAEs that ask for it (SD's) decode in float32, as the diffusers pipelines do
        vae_dtype = torch.float32 if self.dtype == torch.float16 and vae.config.get("force_upcast", False) else self.dtype
        self.vae = place(vae, self.device, vae_dtype)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(self.vae.config.get("shift_factor") or 0.0)
        self.latent_channels = int(self.vae.config.latent_channels)
        if guidance_decoder not in ("vae", "tiny"):
            raise ValueError(f"guidance_decoder must be 'vae' or 'tiny', got {guidance_decoder!r}")
        if guidance_decoder == "tiny" and tiny_vae is None:
            raise ValueError("guidance_decoder 'tiny' needs a tiny VAE (option tiny_vae)")
        self.guidance_decoder = guidance_decoder
        self.tiny_vae = None if tiny_vae is None else place(tiny_vae, self.device, self.dtype)
        if resolution is None:
            resolution = self.denoiser.config.sample_size
            resolution = [s * self.vae_scale_factor for s in _hw(resolution)]
        self.resolution = _hw(resolution)
        f = self.vae_scale_factor * self.patch_size
        if self.resolution[0] % f or self.resolution[1] % f:
            raise ValueError(f"resolution {self.resolution} must be divisible by {f} (VAE factor x patch size)")
        parts = _checkpoint_parts(gradient_checkpointing, ("decoder", "denoiser"), ("decoder",))
        if "decoder" in parts:
            for m in (self.vae, self.tiny_vae):
                if m is not None:
                    m.enable_gradient_checkpointing()
        if "denoiser" in parts:
            self.denoiser.enable_gradient_checkpointing()

    patch_size = 1

    # -- sampler interface
    def noise_shape(self, batch: int) -> tuple[int, ...]:
        h, w = self.resolution
        f = self.vae_scale_factor
        return (batch, self.latent_channels, h // f, w // f)

    def decode(self, x0: torch.Tensor, guidance: bool | None = None) -> torch.Tensor:
        """Model-space latents -> float32 pixels in [-1, 1] at ``real_size`` and the real mode (differentiable)."""
        if guidance is None:
            guidance = torch.is_grad_enabled()
        use_tiny = guidance and self.guidance_decoder == "tiny"
        vae = self.tiny_vae if use_tiny else self.vae
        shift = float(vae.config.get("shift_factor") or 0.0) if use_tiny else self.shift_factor
        scale = float(vae.config.scaling_factor) if use_tiny else self.scaling_factor
        z = x0.to(self.device, vae.dtype) / scale + shift
        images = vae.decode(z).sample.float()
        images = to_mode(embedded.to_real_size(images, self.real_size), self.mode)
        return images.to(x0.device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (any size, 1 or 3 channels) -> model-space latents (the posterior mode)."""
        x = embedded.to_model_space(to_rgb(images.to(self.device, torch.float32)), self.resolution)
        z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode()
        return ((z.float() - self.shift_factor) * self.scaling_factor).to(images.device, images.dtype)

    def predict(self, x: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        out = self._forward(x.to(self.device, self.dtype), self._timestep(t, x.shape[0]), cond.to(self.device, self.dtype))
        return out.to(x.device, x.dtype)

    def _timestep(self, t, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device)
        return t.reshape(-1).expand(batch) if t.numel() == 1 else t.to(self.device)

    def _forward(self, x, t, cond):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- extras
    def modules(self) -> dict[str, nn.Module]:
        """The modules on the sampling path (for benchmarks and compilation)."""
        out = {"denoiser": self.denoiser, "vae": self.vae}
        if self.tiny_vae is not None:
            out["tiny_vae"] = self.tiny_vae
        return out

    def compile(self, decoder: bool = False, **kwargs) -> None:
        """``torch.compile`` the denoiser in place (``nn.Module.compile``), and the VAE's (and tiny VAE's)
        decoder with ``decoder``: run once per image, it is a few per cent of a plain-CFG sample's time."""
        self.denoiser.compile(**kwargs)
        if decoder:
            for vae in (self.vae, self.tiny_vae):
                if vae is not None:
                    vae.decoder.compile(**kwargs)

    wrap_denoiser = TinyBackbone.wrap_denoiser

    @staticmethod
    def _common(checkpoint, options: dict) -> dict:
        """Pop and load the options every latent backbone understands."""
        device = resolve_device(options.pop("device", None))
        dtype = resolve_dtype(options.pop("dtype", None), device)
        guidance_decoder = options.pop("guidance_decoder", "vae")
        tiny_where = options.pop("tiny_vae", None)
        tiny = _load_tiny_vae(tiny_where) if guidance_decoder == "tiny" or tiny_where else None
        return {
            "device": device, "dtype": dtype, "mode": options.pop("mode", None),
            "resolution": options.pop("resolution", None),
            "gradient_checkpointing": options.pop("gradient_checkpointing", False),
            "guidance_decoder": guidance_decoder, "tiny_vae": tiny,
        }


class _PromptBackbone(LatentBackbone):
    """Class -> prompt -> cached text embeddings; the null condition is the empty prompt."""

    def __init__(self, *args, class_names, prompt_template: str = DEFAULT_TEMPLATE, **kwargs):
        super().__init__(*args, **kwargs)
        if not class_names:
            raise ValueError("text-conditioned backbones need the option class_names (one name per class)")
        if "{class_name}" not in prompt_template:
            raise ValueError(f"prompt_template must contain '{{class_name}}', got {prompt_template!r}")
        self.class_names = [str(c) for c in class_names]
        self.prompt_template = prompt_template
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_device = self.device if self.device.type == "meta" else torch.device("cpu")
        self._null: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prompt(self, label: int) -> str:
        return self.prompt_template.format(class_name=self.class_names[label].replace("_", " "))

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        ids = [int(i) for i in labels.reshape(-1).tolist()]
        for i in ids:
            if not 0 <= i < self.num_classes:
                raise ValueError(f"label {i} out of range for {self.num_classes} class names")
        missing = sorted(set(ids) - set(self._cache))
        if missing:  # cached on the CPU: SD3's are 5.5 MB a class
            emb = self._embed([self.prompt(i) for i in missing]).to(self._cache_device)
            for i, e in zip(missing, emb):
                self._cache[i] = e
        return torch.stack([self._cache[i] for i in ids]).to(self.device)

    def null_condition(self, batch: int) -> torch.Tensor:
        if self._null is None:
            self._null = self._embed([""])[0].to(self._cache_device)
        return self._null.unsqueeze(0).expand(batch, *self._null.shape).to(self.device, copy=True)

    def class_embeddings(self) -> torch.Tensor:
        """The conditions of all classes, (C, ...): e.g. for DMGD's ``embedding_noise_std``."""
        return self.condition(torch.arange(self.num_classes))

    @staticmethod
    def _tokenize(tokenizer, prompts, max_length: int) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids


class SD15Backbone(_PromptBackbone):
    """Stable Diffusion 1.x: UNet2DConditionModel on VAE latents, CLIP prompt embeddings (B, 77, 768)."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, real_size, **kwargs):
        super().__init__(unet, vae, scheduler, real_size, **kwargs)
        self.unet = self.denoiser
        self.tokenizer = tokenizer
        self.text_encoder = place(text_encoder, self.device, self.dtype)

    @torch.no_grad()
    def _embed(self, prompts):
        ids = self._tokenize(self.tokenizer, prompts, self.tokenizer.model_max_length).to(self.device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        return self.text_encoder(ids, attention_mask=mask)[0].float()

    def _forward(self, x, t, cond):
        return self.run_denoiser(x, t, encoder_hidden_states=cond).sample

    def modules(self):
        return {**super().modules(), "text_encoder": self.text_encoder}

    @classmethod
    def from_pretrained(cls, checkpoint, real_size, **options) -> "SD15Backbone":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        options = dict(options)
        common = cls._common(checkpoint, options)
        kind = options.pop("scheduler", "ddim")
        variant = options.pop("variant", None)
        names, template = options.pop("class_names", None), options.pop("prompt_template", DEFAULT_TEMPLATE)
        _no_more(options, "sd15")
        path, dt = _path(checkpoint), common["dtype"]
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dt, variant=variant)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dt, variant=variant)
        text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dt, variant=variant)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        return cls(unet, vae, text, tokenizer, _load_scheduler(checkpoint, kind), real_size,
                   class_names=names, prompt_template=template, **common)


class SD3Backbone(_PromptBackbone):
    """Stable Diffusion 3.x (3.5 Medium): MMDiT on flow-matching latents.

    The condition is packed: rows [0, L) are the joint prompt embeddings (CLIP-L ‖ CLIP-G padded to
    the joint dim, then T5 or zeros), rows [L, L + r) the pooled CLIP projections, zero padded.
    """

    def __init__(self, transformer, vae, text_encoders, tokenizers, scheduler, real_size, *,
                 max_sequence_length: int = 256, **kwargs):
        super().__init__(transformer, vae, scheduler, real_size, **kwargs)
        self.transformer = self.denoiser
        if len(text_encoders) != 3 or len(tokenizers) != 3:
            raise ValueError("SD3 needs three text encoders and tokenizers (CLIP-L, CLIP-G, T5 or None)")
        self.text_encoders = [None if m is None else place(m, self.device, self.dtype) for m in text_encoders]
        self.tokenizers = list(tokenizers)
        self.max_sequence_length = int(max_sequence_length)
        self.joint_dim = int(self.transformer.config.joint_attention_dim)
        self.pooled_dim = int(self.transformer.config.pooled_projection_dim)
        self.pooled_rows = math.ceil(self.pooled_dim / self.joint_dim)

    @property
    def patch_size(self) -> int:
        return int(self.denoiser.config.patch_size)

    @torch.no_grad()
    def _embed(self, prompts):
        n = len(prompts)
        clip_embeds, pooled = [], []
        for enc, tok in zip(self.text_encoders[:2], self.tokenizers[:2]):
            ids = self._tokenize(tok, prompts, tok.model_max_length).to(self.device)
            out = enc(ids, output_hidden_states=True)
            pooled.append(out[0].float())
            clip_embeds.append(out.hidden_states[-2].float())
        clip = torch.cat(clip_embeds, dim=-1)
        t5_enc, t5_tok = self.text_encoders[2], self.tokenizers[2]
        if t5_enc is None:
            t5 = torch.zeros(n, self.max_sequence_length, self.joint_dim, device=self.device)
        else:
            ids = t5_tok(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                         add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
            t5 = t5_enc(ids)[0].float()
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        prompt_embeds = torch.cat([clip, t5], dim=-2)
        return self.pack(prompt_embeds, torch.cat(pooled, dim=-1))

    def pack(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """(B, L, D) prompt embeddings + (B, P) pooled -> (B, L + r, D)."""
        b, _, d = prompt_embeds.shape
        rows = F.pad(pooled, (0, self.pooled_rows * d - pooled.shape[-1])).view(b, self.pooled_rows, d)
        return torch.cat([prompt_embeds, rows.to(prompt_embeds.dtype)], dim=1)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of :meth:`pack`: (prompt_embeds (B, L, D), pooled (B, P))."""
        r = self.pooled_rows
        return cond[:, :-r], cond[:, -r:].flatten(1)[:, : self.pooled_dim]

    def _forward(self, x, t, cond):
        prompt_embeds, pooled = self.unpack(cond)
        return self.run_denoiser(hidden_states=x, encoder_hidden_states=prompt_embeds,
                                 pooled_projections=pooled, timestep=t).sample

    def modules(self):
        out = super().modules()
        for name, m in zip(("clip_l", "clip_g", "t5"), self.text_encoders):
            if m is not None:
                out[name] = m
        return out

    @classmethod
    def from_pretrained(cls, checkpoint, real_size, **options) -> "SD3Backbone":
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        options = dict(options)
        common = cls._common(checkpoint, options)
        kind = options.pop("scheduler", "native")
        if kind != "native":
            raise ValueError(f"sd35m samples with its own flow-matching scheduler: scheduler must be 'native', got {kind!r}")
        variant = options.pop("variant", None)
        names, template = options.pop("class_names", None), options.pop("prompt_template", DEFAULT_TEMPLATE)
        max_len = options.pop("max_sequence_length", 256)
        use_t5 = options.pop("use_t5", None)
        _no_more(options, "sd35m")
        path, dt = _path(checkpoint), common["dtype"]
        transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dt, variant=variant)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dt, variant=variant)
        encoders = [CLIPTextModelWithProjection.from_pretrained(path, subfolder=s, dtype=dt, variant=variant)
                    for s in ("text_encoder", "text_encoder_2")]
        tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
        if use_t5 is None:
            use_t5 = _has_part(checkpoint, "text_encoder_3") is not False
        if use_t5:
            encoders.append(T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", dtype=dt, variant=variant))
            tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3"))
        else:
            encoders.append(None)
            tokenizers.append(None)
        return cls(transformer, vae, encoders, tokenizers, _load_scheduler(checkpoint, kind), real_size,
                   class_names=names, prompt_template=template, max_sequence_length=max_len, **common)


class DiTBackbone(LatentBackbone):
    """DiT (XL/2-256): class-conditional transformer on VAE latents; label embeddings as the condition."""

    def __init__(self, transformer, vae, scheduler, real_size, *, class_ids=None, **kwargs):
        super().__init__(transformer, vae, scheduler, real_size, **kwargs)
        self.transformer = self.denoiser
        blocks = self.transformer.transformer_blocks
        embedders = [b.norm1.emb.class_embedder for b in blocks]
        inner = [e.embedding if isinstance(e, _EmbeddingPassThrough) else e for e in embedders]
        self.label_embedder = inner[0]  # a diffusers LabelEmbedding
        tables = [e.embedding_table.weight for e in inner]
        if not tables[0].is_meta and any(not torch.equal(tables[0], w) for w in tables[1:]):
            warnings.warn("DiT blocks hold different label-embedding tables; float conditions use block 0's in "
                          "every block (converted DiT checkpoints share one table, so this only affects others)")
        for b, e in zip(blocks, inner):
            b.norm1.emb.class_embedder = _EmbeddingPassThrough(e)
        self.null_id = int(self.label_embedder.num_classes)
        if class_ids is None:
            class_ids = list(range(self.null_id))
        class_ids = [int(i) for i in class_ids]
        if any(not 0 <= i < self.null_id for i in class_ids):
            raise ValueError(f"class_ids must lie in [0, {self.null_id})")
        self.class_ids = torch.tensor(class_ids, dtype=torch.long)
        self.in_channels = int(self.transformer.config.in_channels)

    @property
    def patch_size(self) -> int:
        return int(self.denoiser.config.patch_size)

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.label_embedder.embedding_table(ids.to(self.device)).float()

    def condition(self, labels: torch.Tensor) -> torch.Tensor:
        return self._lookup(self.class_ids[labels.long().cpu()])

    def null_condition(self, batch: int) -> torch.Tensor:
        return self._lookup(torch.full((batch,), self.null_id, dtype=torch.long))

    def class_embeddings(self) -> torch.Tensor:
        return self.condition(torch.arange(self.num_classes))

    def _forward(self, x, t, cond):
        out = self.run_denoiser(x, timestep=t, class_labels=cond).sample
        if out.shape[1] == 2 * self.in_channels:  # learned sigma: keep epsilon
            out = out[:, : self.in_channels]
        return out

    @classmethod
    def from_pretrained(cls, checkpoint, real_size, **options) -> "DiTBackbone":
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        options = dict(options)
        common = cls._common(checkpoint, options)
        kind = options.pop("scheduler", "ddim")
        variant = options.pop("variant", None)
        class_ids = options.pop("class_ids", None)
        names = options.pop("class_names", None)
        _no_more(options, "dit-xl-2")
        if class_ids is None and names:
            class_ids = imagenet_ids(names, _read_json(checkpoint, "model_index.json").get("id2label"))
        path, dt = _path(checkpoint), common["dtype"]
        transformer = DiTTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dt, variant=variant)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dt, variant=variant)
        return cls(transformer, vae, _load_scheduler(checkpoint, kind), real_size, class_ids=class_ids, **common)


def _read_json(checkpoint, filename: str) -> dict:
    """A JSON file of a local folder, or of a hub repo when cached/reachable; {} when there is none."""
    if _is_local(checkpoint):
        f = Path(_path(checkpoint)) / filename
        return json.loads(f.read_text()) if f.is_file() else {}
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(str(checkpoint), filename)).read_text())
    except Exception:
        return {}


def imagenet_ids(names, id2label: dict | None) -> list[int]:
    """Class names -> ImageNet ids through a DiT pipeline's ``id2label`` (comma-separated synonyms)."""
    if not id2label:
        raise ValueError("dit-xl-2: class_names need the pipeline's id2label (model_index.json); give class_ids")
    lookup = {}
    for key, value in id2label.items():
        for label in str(value).split(","):
            lookup.setdefault(label.strip().lower().replace("_", " "), int(key))
    ids = []
    for name in names:
        key = str(name).strip().lower().replace("_", " ")
        if key not in lookup:
            raise ValueError(f"dit-xl-2: class name {name!r} is not an ImageNet label; give class_ids")
        ids.append(lookup[key])
    return ids


def _no_more(options: dict, name: str) -> None:
    if options:
        raise ValueError(f"unknown option(s) for backbone {name!r}: {', '.join(sorted(options))}")


LATENT_BACKBONES = {"sd15": SD15Backbone, "sd35m": SD3Backbone, "dit-xl-2": DiTBackbone}


def load_backbone(name: str, checkpoint: str, real_size: tuple[int, int], **options):
    """Build the backbone ``name`` from ``checkpoint`` (a packaged name, a local folder or a hub id).

    ``real_size`` is the real set's (H, W) (or (C, H, W)); see the module docstring for ``options``.
    """
    options = dict(options)
    lora = options.pop("lora", None)
    compile_with = _compile_kwargs(options.pop("compile", False))
    channels_last = options.pop("channels_last", None)
    fused = options.pop("fuse_projections", None)
    if name == "tiny":
        options.pop("mode", None)  # the tiny UNet already works in the real set's channels
        _no_more(options, "tiny")
        backbone = TinyBackbone(embedded.load_unet(checkpoint), embedded.load_scheduler(checkpoint), real_size[-2:])
    elif name in LATENT_BACKBONES:
        backbone = LATENT_BACKBONES[name].from_pretrained(checkpoint, real_size, **options)
    else:
        raise ValueError(f"unknown backbone {name!r}; expected one of tiny, {', '.join(LATENT_BACKBONES)}")
    if lora:  # a Real-Fake LoRA adapter folder (factory/realfake.py), merged into the denoiser's weights
        from factory.lora import load_adapter

        load_adapter(backbone.modules()["denoiser"], str(lora))
    # unset: on where they were measured to help (docs/benchmarks.md): NHWC on the tiny UNet (CPU), and NHWC
    # with fused projections on CUDA (+9 % DiT-XL/2, +7 % SD 1.5 plain CFG on an H200, measured compiled
    # together with the decoders; eager, and which switch gives how much, not measured)
    on_cuda = torch.device(getattr(backbone, "device", "cpu")).type == "cuda"
    channels_last = (name == "tiny" or on_cuda) if channels_last is None else bool(channels_last)
    fused = on_cuda if fused is None else bool(fused)
    apply_kernel_options(backbone, fused=fused, channels_last=channels_last)
    if compile_with is not None:  # once per actor: the first shard pays the compile time
        backbone.compile(decoder=True, **compile_with)
    return backbone


def apply_kernel_options(backbone, *, fused: bool, channels_last: bool) -> None:
    """Fused projections (latent backbones' denoisers: ``fuse_projections``) and NHWC for the modules with
    convolutions (UNet, VAEs: cuDNN's and oneDNN's fast layout), in place; the loader and the bench share it."""
    if fused and backbone.latent:
        fuse_projections(backbone.modules()["denoiser"])
    if channels_last:
        for module in backbone.modules().values():
            if any(isinstance(m, nn.Conv2d) for m in module.modules()):
                module.to(memory_format=torch.channels_last)


class _GELUInGEMM(nn.Module):
    """A feed-forward's ``Linear`` + tanh-GELU as one GEMM with the activation in its epilogue (cuBLASLt's
    GELU_BIAS): the hidden activations are written once instead of written, read and written again.

    Only on CUDA and without autograd: ``_addmm_activation`` has no derivative, and on the CPU its GELU is
    the exact one, not tanh; elsewhere (guided steps' backward, CPU) it runs as the unfused pair."""

    def __init__(self, gelu: nn.Module):
        super().__init__()
        self.proj = gelu.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda or torch.is_grad_enabled():
            return F.gelu(self.proj(x), approximate="tanh")
        flat = x.reshape(-1, x.shape[-1])
        out = torch._addmm_activation(self.proj.bias, flat, self.proj.weight.t(), use_gelu=True)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def fuse_projections(module: nn.Module) -> int:
    """Fuse ``module``'s projections for inference; returns how many places changed. Same maths, other rounding.

    Each attention's Q, K and V projections become one GEMM (K and V for cross-attention; diffusers'
    ``fuse_projections`` and ``FusedAttnProcessor2_0``: SD 1.5's and DiT's), and each tanh-GELU
    feed-forward input projection (DiT's) computes its activation in the GEMM's epilogue. For sampling
    only: a LoRA trained on ``to_q``/``to_k``/``to_v`` after fusing would not be seen, so Real-Fake
    training loads unfused.
    """
    from diffusers.models import attention_processor as ap
    from diffusers.models.activations import GELU

    count = 0
    for m in list(module.modules()):  # SD3.5's joint attention stays: its fused processor drops the QK norm
        if isinstance(m, ap.Attention) and type(m.processor) is ap.AttnProcessor2_0 and not m.fused_projections:
            m.fuse_projections()
            m.set_processor(ap.FusedAttnProcessor2_0())
            count += 1
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GELU) and child.approximate == "tanh" and child.proj.bias is not None:
                setattr(parent, name, _GELUInGEMM(child))
                count += 1
    return count


def _compile_kwargs(value) -> dict | None:
    """The ``compile`` option: false, true (torch's defaults) or ``torch.compile`` keyword arguments."""
    if value is None or value is False:
        return None
    return {} if value is True else dict(value)


# ----------------------------------------------------------------------------- feature spaces


class HFImageFeatures(nn.Module):
    """A transformers vision model as a differentiable feature space with its preprocessing in torch.

    pixels in [-1, 1] (B, 1|3, H, W) -> RGB -> resized (bilinear, antialiased) to ``image_size`` ->
    [0, 1] -> (x - mean) / std -> model -> (B, D) float32 on the input's device.
    ``kind`` "dinov2": ``pooler_output`` (the final-norm CLS token); "clip": ``image_embeds``.
    """

    def __init__(self, model: nn.Module, kind: str, image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 device=None, dtype=None, gradient_checkpointing: bool = False):
        super().__init__()
        if kind not in ("dinov2", "clip"):
            raise ValueError(f"unknown feature model kind {kind!r}")
        self.kind = kind
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = place(model, self.device, self.dtype)
        self.image_size = _hw(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(self.device))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1).to(self.device))
        if gradient_checkpointing:
            _checkpointed_layers(self._layers())
        cfg = model.config
        self.feat_dim = int(cfg.projection_dim if kind == "clip" else cfg.hidden_size)

    def _layers(self):
        if self.kind == "dinov2":
            return self.model.encoder.layer
        return self.model.vision_model.encoder.layers

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        x = to_rgb(pixels.to(self.device, torch.float32))
        if tuple(x.shape[-2:]) != self.image_size:
            down = x.shape[-2] > self.image_size[0] or x.shape[-1] > self.image_size[1]
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=down)
        return (((x + 1) / 2 - self.mean) / self.std).to(self.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=self.preprocess(pixels))
        feats = out.pooler_output if self.kind == "dinov2" else out.image_embeds
        return feats.float().to(pixels.device)


def _preprocessor(checkpoint) -> dict:
    """The folder's preprocessor_config.json (mean, std, crop size), or {} (hub ids: fetched if cached)."""
    if _is_local(checkpoint):
        f = Path(_path(checkpoint)) / "preprocessor_config.json"
        return json.loads(f.read_text()) if f.is_file() else {}
    try:
        from transformers.utils import cached_file

        f = cached_file(str(checkpoint), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        return json.loads(Path(f).read_text()) if f else {}
    except Exception:  # offline / not cached: fall back to the model family's defaults
        return {}


def _side(size) -> int | None:
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        return size.get("height") or size.get("shortest_edge")
    return None


def load_features(name: str, checkpoint: str | None = None, **options):
    """A differentiable feature extractor: pixels in [-1, 1] (B, C, H, W) -> (B, D) features."""
    options = dict(options)
    if name == "cnn":
        _no_more(options, "cnn")
        return embedded.load_cnn(checkpoint).eval().requires_grad_(False)
    if name not in DEFAULT_FEATURE_CHECKPOINTS:
        raise ValueError(f"unknown feature space {name!r}; expected cnn, dinov2 or clip")
    checkpoint = checkpoint or DEFAULT_FEATURE_CHECKPOINTS[name]
    device = resolve_device(options.pop("device", None))
    dtype = resolve_dtype(options.pop("dtype", None), device)
    ckpt = bool(options.pop("gradient_checkpointing", False))
    image_size = options.pop("image_size", None)
    variant = options.pop("variant", None)
    compile_with = _compile_kwargs(options.pop("compile", False))
    _no_more(options, name)
    pre = _preprocessor(checkpoint)
    path = _path(checkpoint)
    if name == "dinov2":
        from transformers import Dinov2Model

        model = Dinov2Model.from_pretrained(path, dtype=dtype, variant=variant)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        default_size = 224
    else:
        from transformers import CLIPVisionModelWithProjection

        model = CLIPVisionModelWithProjection.from_pretrained(path, dtype=dtype, variant=variant)
        mean, std = CLIP_MEAN, CLIP_STD
        default_size = model.config.image_size
    size = image_size or _side(pre.get("crop_size")) or _side(pre.get("size")) or default_size
    features = HFImageFeatures(model, name, size, pre.get("image_mean", mean), pre.get("image_std", std),
                               device=device, dtype=dtype, gradient_checkpointing=ckpt)
    if compile_with is not None:
        features.model.compile(**compile_with)
    return features
