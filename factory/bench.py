"""``factory bench``: sampling throughput and FLOPs of one backbone + feature space + guidance setting.

Models have random weights, built from the configs in :mod:`factory.random_models` (``--size full``: the real
architectures; ``--size tiny``: the tiny ones, for CPUs and CI).

One JSON line is printed and returned: ``img_per_s``, ``sec_per_img``, ``tflops_per_img`` counted for
the configuration actually run — with :class:`torch.utils.flop_counter.FlopCounterMode` on one step
of each part (denoiser forward at the CFG batch, a whole guided step — decode, features, energy and
the backward passes —, the final decode), multiplied by the number of plain and guided steps —, the
device name and, on a known GPU, ``mfu`` against its dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from factory.backbones import DTYPES, resolve_device, resolve_dtype
from factory.random_models import build_backbone, build_features
from factory.sampler import Guidance, model_output, predict_cfg, sample

BACKBONES = ("tiny", "sd15", "sd35m", "dit-xl-2")
SIZES = ("tiny", "full")
GUIDANCES = ("none", "chamfer", "ot")
FEATURES = ("cnn", "dinov2", "clip")

# dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, most specific first
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("A100", 312.0))

# ----------------------------------------------------------------------------- FLOPs


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def _addmm_activation_flops(bias_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import mm_flop

    return mm_flop(a_shape, b_shape)


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` by FlopCounterMode; CPU flash attention (not in torch's table) is counted like CUDA's."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
               aten._addmm_activation: _addmm_activation_flops}  # the GELU-in-GEMM of fuse_projections
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


class _ViewedInput:
    """The backbone, handed a view of its input: FlopCounterMode's module hooks cannot take the sampler's
    leaf itself (a CFG-free step with an unscaled input), and a view in the sampler would move its bytes."""

    def __init__(self, backbone):
        self._backbone = backbone

    def predict(self, x, t, cond):
        return self._backbone.predict(x.view_as(x), t, cond)

    def __getattr__(self, name):
        return getattr(self._backbone, name)


def flop_breakdown(backbone, features, guidance, labels, steps, cfg_scale, grad_through) -> dict:
    """FLOPs of one sampling batch by part, from one counted step of each part times its step count."""
    scheduler = backbone.scheduler
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    n = len(timesteps)
    guided = [i for i in range(n) if any(g.active(i, n) for g in guidance)]
    batch = labels.shape[0]
    x = torch.randn(backbone.noise_shape(batch)).to(getattr(backbone, "device", "cpu"))  # as the sampler does
    cond = backbone.condition(labels)
    null = backbone.null_condition(batch) if cfg_scale != 1.0 else None
    i = guided[0] if guided else 0
    t = timesteps[i]
    with torch.no_grad():
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        den = count_flops(lambda: predict_cfg(backbone, x_in, t, cond, null, cfg_scale))
        final = count_flops(lambda: backbone.decode(x, guidance=False) if backbone.latent else backbone.decode(x))
        parts = {"denoiser_fwd": den * n, "final_decode": final}
        if guided:
            dec = count_flops(lambda: backbone.decode(x, guidance=True) if backbone.latent else backbone.decode(x))
            pixels = backbone.decode(x)
            feat = count_flops(lambda: features(pixels))
    if guided:
        active = [g for g in guidance if g.active(i, n)]  # the energies of the first guided step
        step = count_flops(lambda: model_output(_ViewedInput(backbone), scheduler, x, t, i, cond, null, cfg_scale,
                                                active, features, None, grad_through, []))
        g = len(guided)
        parts.update({"guide_decode_fwd": dec * g, "features_fwd": feat * g,
                      "backward_and_energy": max(step - den - dec - feat, 0) * g})
    parts["total"] = sum(parts.values())
    return {"steps": n, "guided_steps": len(guided), "flops_per_batch": parts}


# ----------------------------------------------------------------------------- the bench


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--backbone", choices=BACKBONES, default="tiny")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="tiny test configs or the real architectures")
    parser.add_argument("--guidance", choices=GUIDANCES, default="none")
    parser.add_argument("--batch", type=int, default=None, help="images per sampling batch (default 4 tiny, 8 full)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 4 tiny, 25 full)")
    parser.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default=None,
                        help="compute dtype (default bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser and feature model")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode with --compile (e.g. max-autotune-no-cudagraphs; default torch's)")
    parser.add_argument("--fuse-projections", action="store_true",
                        help="one QKV GEMM per attention, DiT's GELU in its GEMM (backbones.fuse_projections)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC convolutions (denoiser and VAEs)")
    parser.add_argument("--compile-decoder", action="store_true", help="with --compile: the VAE decoders too")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="cuDNN picks conv algorithms by timing them (not deterministic across processes)")
    parser.add_argument("--inductor-tuning", action="store_true",
                        help="with --compile: inductor's coordinate-descent tuning of its own kernels")
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="CFG scale; 1 = no unconditional pass")
    parser.add_argument("--grad-through", choices=("model", "x0"), default="model")
    parser.add_argument("--guidance-decoder", choices=("vae", "tiny"), default="vae")
    parser.add_argument("--features", choices=FEATURES, default=None,
                        help="feature space (default cnn for the tiny backbone, dinov2 otherwise)")
    parser.add_argument("--every", type=int, default=None,
                        help="guide every N steps (default: chamfer 5 over all steps; ot 1 in DMGD's window)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in the decoder and feature model")
    parser.add_argument("--repeats", type=int, default=1, help="timed sampling batches")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, profile a batch of STEPS steps: the row gains the top kernels' "
                             "shares of device time and a share per kind (gemm, attention, conv, ...)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed sampling batches first")
    parser.add_argument("--device", default=None, help="default cuda when available")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--flops-only", action="store_true",
                        help="build on the meta device and count FLOPs only (no timing; full size without a GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--suite", choices=("gpu",), default=None,
                        help="run the whole grid (backbones x plain CFG / Chamfer CFG-free / + tiny decoder / OT "
                             "window, eager then compiled) in one process; --size tiny on a CPU")
    parser.add_argument("--budget-s", type=float, default=420.0, help="the suite's time budget: rows past it skip")
    parser.add_argument("--suite-backbones", default=None, help="comma-separated subset of the suite's backbones")
    parser.add_argument("--out", default=None, help="folder for the suite's suite.jsonl and suite.md")
    return parser


def peak_tflops(device_name: str) -> float | None:
    for fragment, peak in PEAK_TFLOPS:
        if fragment in device_name:
            return peak
    return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _energies(kind: str, features, probe: torch.Tensor, every: int | None, seed: int) -> list[Guidance]:
    """The bench's energy: references are the features of random images shaped like ``probe``."""
    if kind == "none":
        return []
    from factory.guidance import ChamferEnergy, OTEnergy
    from factory.guidance.ot import DMGD_OT_WINDOW

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        refs = features((torch.rand(probe.shape, generator=g) * 2 - 1).to(probe.device))  # on the device
    if kind == "chamfer":
        return [Guidance(ChamferEnergy(refs), weight=1.0, every=every or 5, name="chamfer")]
    lo, hi = DMGD_OT_WINDOW  # in t / T (1 = noise); the sampler's window is in i / steps (0 = noise)
    k = min(4, refs.shape[0])
    energy = (ChamferEnergy(refs[:k]) if refs.is_meta  # POT needs values; its cost is negligible anyway
              else OTEnergy(refs[:k], torch.full((k,), 1.0 / k)))
    return [Guidance(energy, weight=1.0, every=every or 1, window=(1 - hi, 1 - lo), name="ot")]


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def measure(backbone, features, guidance: list[Guidance], *, batch: int, steps: int, cfg_scale: float,
            grad_through: str, warmup: int = 1, repeats: int = 1, seed: int = 0, flops_only: bool = False) -> dict:
    """Time ``warmup`` + ``repeats`` sampling batches on the backbone's device and count their FLOPs by part."""
    device = getattr(backbone, "device", torch.device("cpu"))
    labels = torch.arange(batch) % getattr(backbone, "num_classes", 10)

    def run(s):
        return sample(backbone, backbone.scheduler, labels, torch.Generator().manual_seed(s), steps,
                      cfg_scale=cfg_scale, guidance=guidance, features=features if guidance else None,
                      grad_through=grad_through)

    out = {}
    if not flops_only:
        t0 = time.perf_counter()
        for r in range(warmup):  # kernels, autotuning and the allocator: a short batch warms every path
            sample(backbone, backbone.scheduler, labels, torch.Generator().manual_seed(seed + 1000 + r),
                   min(steps, 5), cfg_scale=cfg_scale, guidance=guidance, features=features if guidance else None,
                   grad_through=grad_through)
        _sync(device)
        out["warmup_s"] = round(time.perf_counter() - t0, 2)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for r in range(repeats):
            result = run(seed + r)
        _sync(device)
        elapsed = time.perf_counter() - t0
        if not torch.isfinite(result.images).all():
            raise FloatingPointError("bench sampling produced NaN or Inf")
        out["img_per_s"] = batch * repeats / elapsed
        if device.type == "cuda":
            out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    flops = flop_breakdown(backbone, features, guidance, labels, steps, cfg_scale, grad_through)
    out["flops"] = flops
    return out


# kernel kinds by name fragment, first match wins (cuBLAS / CUTLASS / cuDNN / Triton / ATen kernel names)
KERNEL_KINDS = (("attention", ("flash", "fmha", "attention", "sdpa")),
                ("conv", ("convolution", "conv2d", "fprop", "dgrad", "wgrad", "implicit", "winograd", "cudnn")),
                ("gemm", ("gemm", "nvjet", "cutlass", "addmm", "aten::mm", "aten::bmm", "matmul", "linear")),
                ("norm", ("norm",)),
                ("elementwise", ("triton", "elementwise", "vectorized", "unrolled", "reduce", "gelu", "silu",
                                 "aten::add", "aten::mul", "aten::copy", "aten::cat", "aten::sub", "aten::div")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, frags in KERNEL_KINDS if any(f in low for f in frags)), "other")


def profile_sampling(backbone, features, guidance, *, batch: int, steps: int, cfg_scale: float, grad_through: str,
                     seed: int = 0, top: int = 20) -> dict:
    """Where one sampling batch's time goes: ``torch.profiler`` over it, device kernels on CUDA (their own
    time), operators' self time on a CPU. Returns the top entries and the share per kernel kind."""
    from torch.profiler import ProfilerActivity, profile

    device = getattr(backbone, "device", torch.device("cpu"))
    cuda = device.type == "cuda"
    labels = torch.arange(batch) % getattr(backbone, "num_classes", 10)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        sample(backbone, backbone.scheduler, labels, torch.Generator().manual_seed(seed), steps, cfg_scale=cfg_scale,
               guidance=guidance, features=features if guidance else None, grad_through=grad_through)
        _sync(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    if cuda:  # kernels only: an operator's device time is its kernels', counted once here
        events = [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                  if str(getattr(e, "device_type", "")).endswith("CUDA") and e.self_device_time_total > 0]
    else:
        events = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(t for _, t, _ in events) or 1.0
    kinds: dict[str, float] = {}
    for name, t, _ in events:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + t / total
    events.sort(key=lambda e: -e[1])
    return {"steps": steps, "clock": "device kernels" if cuda else "cpu self time",
            "busy": _sig(total / wall_us) if cuda else None,  # kernel time over the profiled wall time
            "by_kind": {k: _sig(v) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:100], "share": _sig(t / total), "ms": _sig(t / 1e3), "calls": c}
                    for n, t, c in events[:top]]}


def _row(args, backbone, features, feat_name, batch, m: dict, device_name: str, build_s: float) -> dict:
    import diffusers

    flops = m["flops"]
    tflops_per_img = flops["flops_per_batch"]["total"] / batch / 1e12
    out = {
        "backbone": args.backbone, "size": args.size, "guidance": args.guidance, "features": feat_name,
        "batch": batch, "steps": flops["steps"], "guided_steps": flops["guided_steps"],
        "cfg_scale": args.cfg_scale, "grad_through": args.grad_through, "guidance_decoder": args.guidance_decoder,
        "dtype": {v: k for k, v in DTYPES.items()}[getattr(backbone, "dtype", torch.float32)],
        "compile": (getattr(args, "compile_mode", None) or True) if args.compile else False,
        "speedups": [k for k in ("fuse_projections", "channels_last", "compile_decoder", "cudnn_benchmark",
                                 "inductor_tuning") if getattr(args, k, False)],
        "resolution": list(getattr(backbone, "resolution", ())) or None,
        "img_per_s": None, "sec_per_img": None,
        "tflops_per_img": _sig(tflops_per_img),
        "tflops_per_img_by_part": {k: _sig(v / batch / 1e12) for k, v in flops["flops_per_batch"].items()
                                   if k != "total"},
        "achieved_tflops": None,
        "device": device_name, "build_s": round(build_s, 2),
        "params_m": {k: round(sum(p.numel() for p in mod.parameters()) / 1e6, 3)
                     for k, mod in {**backbone.modules(), "features": features}.items()},
        "torch": torch.__version__, "diffusers": diffusers.__version__,
    }
    if "img_per_s" in m:
        ips = m["img_per_s"]
        out.update({"img_per_s": _sig(ips), "sec_per_img": _sig(1 / ips), "achieved_tflops": _sig(tflops_per_img * ips),
                    "warmup_s": m["warmup_s"]})
        if "peak_mem_gib" in m:
            out["peak_mem_gib"] = m["peak_mem_gib"]
        peak = peak_tflops(device_name) if device_name.startswith("NVIDIA") or "H100" in device_name else None
        if peak:
            out["peak_tflops_bf16_dense"] = peak
            out["mfu"] = _sig(tflops_per_img * ips / peak)
    return out


def run_bench(args) -> dict:
    """Run the bench described by ``args`` (from :func:`add_arguments`); print and return one JSON dict.

    With ``--flops-only`` the models are built on the meta device (no memory, no compute) and only the
    FLOP counts are reported: the way to get full-size numbers on a machine without a GPU.
    """
    if getattr(args, "suite", None):
        return run_suite(args)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    flops_only = bool(getattr(args, "flops_only", False))
    device = torch.device("meta") if flops_only else resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("bf16" if flops_only else None), device)
    batch = args.batch or (4 if args.size == "tiny" else 8)
    steps = args.steps or (4 if args.size == "tiny" else 25)
    feat_name = args.features or ("cnn" if args.backbone == "tiny" else "dinov2")
    if feat_name == "cnn" and args.backbone != "tiny":
        raise ValueError("the cnn feature space works on the tiny backbone's grey 8x8 images only")
    t0 = time.perf_counter()
    extra = {"gradient_checkpointing": True} if args.gradient_checkpointing and args.backbone != "tiny" else {}
    backbone = build_backbone(args.backbone, args.size, device=device, dtype=dtype,
                              guidance_decoder=args.guidance_decoder, seed=args.seed, **extra)
    features = build_features(feat_name, args.size, device=device, dtype=dtype,
                              gradient_checkpointing=args.gradient_checkpointing, seed=args.seed)
    guidance = _energies(args.guidance, features, _probe(backbone, flops_only), args.every, args.seed)
    _speedups(args, backbone)
    if args.compile and not flops_only:
        kw = {"mode": args.compile_mode} if getattr(args, "compile_mode", None) else {}
        if getattr(args, "inductor_tuning", False):
            import torch._inductor.config as inductor

            inductor.coordinate_descent_tuning = True
        if hasattr(backbone, "compile"):
            backbone.compile(decoder=bool(getattr(args, "compile_decoder", False)), **kw)
        else:
            backbone.unet.compile(**kw)
        features.compile(**kw)
    build_s = time.perf_counter() - t0
    m = measure(backbone, features, guidance, batch=batch, steps=steps, cfg_scale=args.cfg_scale,
                grad_through=args.grad_through, warmup=args.warmup, repeats=args.repeats, seed=args.seed,
                flops_only=flops_only)
    name = "meta (FLOPs only)" if flops_only else _device_name(device)
    out = _row(args, backbone, features, feat_name, batch, m, name, build_s)
    if getattr(args, "profile", 0) and not flops_only:
        out["profile"] = profile_sampling(backbone, features, guidance, batch=batch, steps=args.profile,
                                          cfg_scale=args.cfg_scale, grad_through=args.grad_through, seed=args.seed)
    if out["resolution"] is None:
        out["resolution"] = list(_probe(backbone, flops_only).shape[-2:])
    print(json.dumps(out), flush=True)
    return out


def _speedups(args, backbone) -> None:
    """The bench's optional layout and kernel switches, applied as ``load_backbone`` applies its options."""
    from factory.backbones import apply_kernel_options

    if getattr(args, "cudnn_benchmark", False):
        torch.backends.cudnn.benchmark = True
    apply_kernel_options(backbone, fused=bool(getattr(args, "fuse_projections", False)),
                         channels_last=bool(getattr(args, "channels_last", False)))


def _probe(backbone, flops_only: bool = False) -> torch.Tensor:
    """16 decoded images' worth of shape, on the backbone's device: what the bench's references look like."""
    device = "meta" if flops_only else getattr(backbone, "device", "cpu")
    with torch.no_grad():
        probe = backbone.decode(torch.zeros(backbone.noise_shape(1), device=device))
    return probe.expand(16, -1, -1, -1)


# ----------------------------------------------------------------------------- the GPU suite

# The grid: each backbone at its native resolution and a batch that fills an H100 without checkpointing,
# and the four ways the factory samples. Plain CFG at the papers' scales; Chamfer CFG-free (paper 000's
# cheaper mode), with the VAE or the tiny decoder on the guidance path; DMGD's OT term in its window.
SUITE_BACKBONES = {  # name: (batch full, batch tiny, steps, cfg scale)
    "dit-xl-2": (32, 4, 50, 4.0),
    "sd15": (16, 4, 25, 7.5),
    "sd35m": (4, 2, 25, 5.0),
}
SUITE_MODES = {  # mode: (guidance, cfg on?, guidance decoder)
    "cfg": ("none", True, "vae"),
    "chamfer-cfg-free": ("chamfer", False, "vae"),
    "chamfer-cfg-free-taesd": ("chamfer", False, "tiny"),
    "ot-window": ("ot", True, "vae"),
}

SUITE_COMPILED_MODES = ("cfg", "chamfer-cfg-free-taesd")  # the pair the speed targets compare


def _suite_table(rows: list[dict]) -> str:
    head = ("| backbone | mode | compile | batch | steps (guided) | img/s | s/img | TFLOP/img | achieved TFLOP/s "
            "| MFU | peak GiB | wall vs cfg |")
    lines = [head, "|" + "---|" * 12]
    base = {(r["backbone"], r["compile"]): r["sec_per_img"] for r in rows if r.get("mode") == "cfg" and r.get("sec_per_img")}
    for r in rows:
        if r.get("skipped") or r.get("error"):
            lines.append(f"| {r['backbone']} | {r['mode']} | {r.get('compile', False)} | | | "
                         f"{'skipped: ' + r['skipped'] if r.get('skipped') else 'error: ' + r['error'][:80]} | | | | | | |")
            continue
        b = base.get((r["backbone"], r["compile"]))
        ratio = f"{r['sec_per_img'] / b:.2f}x" if b and r["sec_per_img"] else ""
        lines.append(
            f"| {r['backbone']} | {r['mode']} | {r['compile']} | {r['batch']} | {r['steps']} ({r['guided_steps']}) | "
            f"{r['img_per_s']} | {r['sec_per_img']} | {r['tflops_per_img']} | {r['achieved_tflops']} | "
            f"{r.get('mfu', '')} | {r.get('peak_mem_gib', '')} | {ratio} |")
    return "\n".join(lines)


def run_suite(args) -> dict:
    """``factory bench --suite gpu``: the whole grid in one process, each backbone built once, within a budget.

    Rows run in priority order (eager first, then compiled where time is left); a row is skipped, and
    says so, when the time it is expected to take (its backbone's last row, else a guess) would pass
    ``--budget-s``. An out-of-memory row retries once at half the batch. JSON lines go to stdout (and
    ``--out``/suite.jsonl), the markdown table last (and ``--out``/suite.md). Each backbone samples as an
    actor would load it: on CUDA with fused projections and NHWC, compiled rows with the decoders compiled.
    """
    import argparse as _argparse
    import os

    from factory.backbones import apply_kernel_options

    t_start = time.perf_counter()
    budget = float(args.budget_s)
    device = resolve_device(args.device)
    size = args.size
    dtype = resolve_dtype(args.dtype, device)
    backbones = args.suite_backbones.split(",") if getattr(args, "suite_backbones", None) else list(SUITE_BACKBONES)
    compile_options = (False, True) if (args.compile or device.type == "cuda") else (False,)
    out_dir = getattr(args, "out", None)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    rows: list[dict] = []
    features = build_features("dinov2", size, device=device, dtype=dtype, seed=args.seed)
    device_name = _device_name(device)

    def left() -> float:
        return budget - (time.perf_counter() - t_start)

    def emit(row):
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if out_dir:
            with open(os.path.join(out_dir, "suite.jsonl"), "a") as f:
                f.write(line + "\n")

    for compiled in compile_options:
        for name in backbones:
            batch_full, batch_tiny, steps, cfg = SUITE_BACKBONES[name]
            batch = args.batch or (batch_full if size == "full" else batch_tiny)
            steps = args.steps or (steps if size == "full" else 3)
            last = [r for r in rows if r["backbone"] == name and r.get("row_s")]
            guess = (max(r["row_s"] for r in last) * (2.0 if compiled else 1.0)) if last else 0.0
            if left() < guess + 10:
                emit({"backbone": name, "mode": "*", "compile": compiled, "skipped": f"budget ({left():.0f} s left)"})
                continue
            t0 = time.perf_counter()
            try:
                backbone = build_backbone(name, size, device=device, dtype=dtype, guidance_decoder="tiny",
                                          seed=args.seed)
            except torch.cuda.OutOfMemoryError as e:
                emit({"backbone": name, "mode": "*", "compile": compiled, "error": f"build: {e}"})
                continue
            fast = device.type == "cuda"  # the sampling defaults there (load_backbone): fused projections, NHWC
            apply_kernel_options(backbone, fused=fast, channels_last=fast)
            if compiled:
                backbone.compile(decoder=True)
                features.compile()
            build_s = time.perf_counter() - t0
            probe = _probe(backbone)
            for mode, (guidance_kind, with_cfg, decoder) in SUITE_MODES.items():
                if compiled and mode not in SUITE_COMPILED_MODES:
                    continue
                prior = [r["row_s"] for r in rows if r["backbone"] == name and r.get("row_s")]
                if prior and left() < max(prior) + 5:
                    emit({"backbone": name, "mode": mode, "compile": compiled, "skipped": f"budget ({left():.0f} s left)"})
                    continue
                backbone.guidance_decoder = decoder
                guidance = _energies(guidance_kind, features, probe, None, args.seed)
                cfg_scale = cfg if with_cfg else 1.0
                row_args = _argparse.Namespace(backbone=name, size=size, guidance=guidance_kind, cfg_scale=cfg_scale,
                                               grad_through=args.grad_through, guidance_decoder=decoder,
                                               compile=compiled, fuse_projections=fast, channels_last=fast,
                                               compile_decoder=compiled)
                b = batch
                t_row = time.perf_counter()
                for attempt in range(2):
                    try:
                        m = measure(backbone, features, guidance, batch=b, steps=steps, cfg_scale=cfg_scale,
                                    grad_through=args.grad_through, warmup=args.warmup, repeats=args.repeats,
                                    seed=args.seed)
                        row = _row(row_args, backbone, features, "dinov2", b, m, device_name, build_s)
                        break
                    except torch.cuda.OutOfMemoryError as e:
                        torch.cuda.empty_cache()
                        if attempt or b == 1:
                            row = {"error": f"out of memory at batch {b}: {str(e)[:120]}"}
                            break
                        b = max(1, b // 2)
                    except Exception as e:  # one broken row (a compile failure, say) must not cost the grid
                        row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                        break
                row.update({"backbone": name, "mode": mode, "compile": compiled,
                            "row_s": round(time.perf_counter() - t_row, 1)})
                emit(row)
            del backbone
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = _suite_table(rows)
    print(table, flush=True)
    if out_dir:
        with open(os.path.join(out_dir, "suite.md"), "w") as f:
            f.write(f"{device_name}, torch {torch.__version__}, {size} size, budget {budget:.0f} s, "
                    f"wall {time.perf_counter() - t_start:.0f} s\n\n{table}\n")
    return {"suite": args.suite, "device": device_name, "rows": rows,
            "wall_s": round(time.perf_counter() - t_start, 1)}


def main(argv=None) -> dict:
    parser = add_arguments(argparse.ArgumentParser(prog="factory bench", description=__doc__.splitlines()[0]))
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    main()
