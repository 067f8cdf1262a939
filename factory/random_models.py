"""Random-weight models built from configs (no hub, no download): the full-size architectures for the GPU
benchmark and the tiny configs the rehearsal and the tests save and reload.

- ``full``: SD 1.5 (UNet 860M, VAE, CLIP-L text), SD 3.5 Medium (MMDiT-X 2.5B, 16-channel VAE, CLIP-L + CLIP-G
  text; T5-XXL is left out: SD3 pipelines allow it, the transformer then sees zeros in its 256 token rows, so the
  denoiser's cost is the same), DiT-XL/2-256 (+ the SD VAE), DINOv2-L/14 and CLIP ViT-L/14 at 224 px, the
  embedded tiny UNet and CNN at the digits recipe's size.
- ``tiny``: the same kinds a few layers wide, for CPUs.
"""

from __future__ import annotations

import contextlib
import math
import string
from pathlib import Path

import torch

from factory import embedded
from factory.backbones import (
    DiTBackbone,
    HFImageFeatures,
    SD3Backbone,
    SD15Backbone,
    TinyBackbone,
    resolve_device,
    resolve_dtype,
)

# ----------------------------------------------------------------------------- configs

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": False,
                "clip_sample": False, "prediction_type": "epsilon"}
DIT_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                 "clip_sample": False, "prediction_type": "epsilon"}
FLOW_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}

SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
          "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215}
SD3_VAE = {**SD_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
           "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": False}
TAESD = {"latent_channels": 4}  # diffusers' AutoencoderTiny defaults are TAESD's architecture
TAESD3 = {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609}
CLIP_L_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
               "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
CLIP_G_TEXT = {**CLIP_L_TEXT, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
               "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}

FULL = {
    "sd15": {
        "unet": {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                 "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3},
        "vae": SD_VAE, "tiny_vae": TAESD, "text": CLIP_L_TEXT, "scheduler": SD_SCHEDULER,
    },
    "sd35m": {
        "transformer": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
                        "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
                        "qk_norm": "rms_norm", "dual_attention_layers": list(range(13))},
        "vae": SD3_VAE, "tiny_vae": TAESD3, "text": [CLIP_L_TEXT, CLIP_G_TEXT], "t5": None,
        "max_sequence_length": 256, "scheduler": FLOW_SCHEDULER,
    },
    "dit-xl-2": {
        "transformer": {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
                        "num_layers": 28, "sample_size": 32, "patch_size": 2, "num_embeds_ada_norm": 1000,
                        "norm_type": "ada_norm_zero", "norm_elementwise_affine": False},
        "vae": SD_VAE, "tiny_vae": TAESD, "scheduler": DIT_SCHEDULER,
    },
    "tiny": {"unet": {"sample_size": 8, "in_channels": 1, "num_classes": 10, **embedded.RECIPES["digits"]["unet"]}},
    "dinov2": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4,
               "patch_size": 14, "image_size": 518, "layerscale_value": 1.0, "image_input_size": 224},
    "clip": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "patch_size": 14, "image_size": 224, "projection_dim": 768, "hidden_act": "quick_gelu"},
    "cnn": {"in_channels": 1, "num_classes": 10, "image_size": [8, 8], **embedded.RECIPES["digits"]["cnn"]},
}

_TINY_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8, 16],
             "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
             "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 0.18215}
_TINY_TAESD = {"latent_channels": 4, "encoder_block_out_channels": [8, 8], "decoder_block_out_channels": [8, 8],
               "num_encoder_blocks": [1, 1], "num_decoder_blocks": [1, 1]}
_TINY_TEXT = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
              "num_attention_heads": 4, "max_position_embeddings": 77, "projection_dim": 32,
              "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}

TINY = {
    "sd15": {
        "unet": {"sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
                 "block_out_channels": [16, 32], "cross_attention_dim": 32, "attention_head_dim": 4,
                 "norm_num_groups": 8, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
        "vae": _TINY_VAE, "tiny_vae": _TINY_TAESD, "text": _TINY_TEXT, "scheduler": SD_SCHEDULER,
    },
    "sd35m": {
        "transformer": {"sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
                        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 64,
                        "caption_projection_dim": 16, "pooled_projection_dim": 32, "pos_embed_max_size": 16,
                        "qk_norm": "rms_norm", "dual_attention_layers": [0]},
        "vae": {**_TINY_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
                "use_post_quant_conv": False},
        "tiny_vae": {**_TINY_TAESD, "scaling_factor": 1.5305, "shift_factor": 0.0609},
        "text": [{**_TINY_TEXT, "hidden_size": 16, "projection_dim": 16}] * 2,
        "t5": {"vocab_size": 100, "d_model": 64, "d_ff": 64, "d_kv": 8, "num_heads": 2, "num_layers": 1,
               "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 8},
        "max_sequence_length": 16, "scheduler": FLOW_SCHEDULER,
    },
    "dit-xl-2": {
        "transformer": {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
                        "num_layers": 2, "sample_size": 16, "patch_size": 4, "num_embeds_ada_norm": 1000,
                        "norm_type": "ada_norm_zero", "norm_elementwise_affine": False},
        "vae": _TINY_VAE, "tiny_vae": _TINY_TAESD, "scheduler": DIT_SCHEDULER,
    },
    "tiny": {"unet": {"sample_size": 8, "in_channels": 1, "num_classes": 10, "channels": (16, 32),
                      "attention": False}},
    "dinov2": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2,
               "patch_size": 4, "image_size": 32, "image_input_size": 32},
    "clip": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "patch_size": 4, "image_size": 32, "projection_dim": 16},
    "cnn": {"in_channels": 1, "num_classes": 10, "image_size": [8, 8], "work_size": 8, "width": 8, "feat_dim": 16},
}

CONFIGS = {"tiny": TINY, "full": FULL}
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------- builders


def char_tokenizer(model_max_length: int = 77):
    """A character-level CLIP BPE tokenizer (no merges, 82 ids) built in memory: no hub needed."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + "-'.,":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def build_components(name: str, size: str = "tiny", seed: int = 0) -> dict:
    """The diffusers/transformers components of backbone ``name`` at ``size``, random weights (float32, CPU
    unless a ``torch.device`` context is active), keyed like a diffusers pipeline folder's subfolders."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    cfg = CONFIGS[size][name]
    torch.manual_seed(seed)
    if name == "tiny":
        unet_cfg = dict(cfg["unet"])
        unet = embedded.build_unet(embedded.tiny_unet_config(
            unet_cfg.pop("sample_size"), unet_cfg.pop("in_channels"), unet_cfg.pop("num_classes"), **unet_cfg))
        return {"unet": unet, "scheduler": diffusers.DDIMScheduler(**embedded.scheduler_config())}
    out = {"vae": diffusers.AutoencoderKL(**cfg["vae"]), "tiny_vae": diffusers.AutoencoderTiny(**cfg["tiny_vae"])}
    if name == "sd15":
        out["unet"] = diffusers.UNet2DConditionModel(**cfg["unet"])
        out["text_encoder"] = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
        out["tokenizer"] = char_tokenizer()
        out["scheduler"] = diffusers.PNDMScheduler.from_config({**cfg["scheduler"], "skip_prk_steps": True})
    elif name == "sd35m":
        out["transformer"] = diffusers.SD3Transformer2DModel(**cfg["transformer"])
        for i, text in enumerate(cfg["text"]):
            suffix = "" if i == 0 else f"_{i + 1}"
            out[f"text_encoder{suffix}"] = CLIPTextModelWithProjection(CLIPTextConfig(**text))
            out[f"tokenizer{suffix}"] = char_tokenizer()
        if cfg["t5"] is not None:
            out["text_encoder_3"] = T5EncoderModel(T5Config(**cfg["t5"]))
            out["tokenizer_3"] = char_tokenizer(cfg["max_sequence_length"])
        out["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler(**cfg["scheduler"])
    elif name == "dit-xl-2":
        dit = diffusers.DiTTransformer2DModel(**cfg["transformer"])
        # converted DiT checkpoints copy the one y_embedder table into every block: do the same
        table = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
        with torch.no_grad():
            for block in dit.transformer_blocks[1:]:
                block.norm1.emb.class_embedder.embedding_table.weight.copy_(table)
        out["transformer"] = dit
        out["scheduler"] = diffusers.DDIMScheduler(**cfg["scheduler"])
    else:
        raise ValueError(f"unknown backbone {name!r}")
    return out


def save_pipeline(components: dict, folder) -> None:
    """Write ``components`` in the layout a diffusers pipeline's ``save_pretrained`` writes."""
    folder = Path(folder)
    for key, module in components.items():
        if module is not None:
            module.save_pretrained(str(folder / key))


def build_features_model(name: str, size: str = "tiny", seed: int = 0):
    """(model, input_size) of feature space ``name`` at ``size`` with random weights."""
    cfg = dict(CONFIGS[size][name])
    torch.manual_seed(seed)
    if name == "cnn":
        return embedded.FeatureCNN(**cfg), None
    input_size = cfg.pop("image_input_size", cfg["image_size"])
    if name == "dinov2":
        from transformers import Dinov2Config, Dinov2Model

        return Dinov2Model(Dinov2Config(**cfg)), input_size
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)), input_size


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build random-weight models directly in ``dtype`` (no float32 copy of a full-size model)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_backbone(name: str, size: str, real_size=None, *, device=None, dtype=None, guidance_decoder="vae",
                   num_classes: int = 10, seed: int = 0, **options):
    """A backbone of ``size`` with random weights, in memory (``real_size`` default: the model's own size)."""
    device = resolve_device(device)
    dtype = torch.float32 if name == "tiny" else resolve_dtype(dtype, device)  # the tiny UNet runs in float32
    with torch.device(device), _default_dtype(dtype):
        c = build_components(name, size, seed)
    if name == "tiny":
        s = c["unet"].config.sample_size
        return TinyBackbone(c["unet"].to(device), c["scheduler"], real_size or embedded._hw(s))
    common = {"device": device, "dtype": dtype, "guidance_decoder": guidance_decoder, **options}
    if guidance_decoder == "tiny":
        common["tiny_vae"] = c["tiny_vae"]
    denoiser = c.get("unet") or c.get("transformer")
    f = 2 ** (len(c["vae"].config.block_out_channels) - 1)
    real_size = real_size or tuple(s * f for s in embedded._hw(denoiser.config.sample_size))
    names = (CLASS_NAMES * math.ceil(num_classes / len(CLASS_NAMES)))[:num_classes]
    if name == "sd15":
        from diffusers import DDIMScheduler

        return SD15Backbone(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"],
                            DDIMScheduler.from_config(c["scheduler"].config), real_size, class_names=names, **common)
    if name == "sd35m":
        encoders = [c["text_encoder"], c["text_encoder_2"], c.get("text_encoder_3")]
        tokenizers = [c["tokenizer"], c["tokenizer_2"], c.get("tokenizer_3")]
        return SD3Backbone(c["transformer"], c["vae"], encoders, tokenizers, c["scheduler"], real_size,
                           class_names=names, max_sequence_length=CONFIGS[size][name]["max_sequence_length"], **common)
    return DiTBackbone(c["transformer"], c["vae"], c["scheduler"], real_size,
                       class_ids=list(range(num_classes)), **common)


def build_features(name: str, size: str, *, device=None, dtype=None, gradient_checkpointing=False, seed: int = 0):
    device = resolve_device(device)
    dtype = torch.float32 if name == "cnn" else resolve_dtype(dtype, device)  # the embedded CNN runs in float32
    with torch.device(device), _default_dtype(dtype):
        model, input_size = build_features_model(name, size, seed)
    if name == "cnn":
        return model.to(device).eval().requires_grad_(False)
    return HFImageFeatures(model, name, input_size, device=device, dtype=dtype,
                           gradient_checkpointing=gradient_checkpointing)
