"""``factory bench`` at the tiny size: one sane JSON line per backbone, FLOPs that follow the configuration."""

import argparse
import json

import pytest

from factory.bench import BACKBONES, add_arguments, peak_tflops, run_bench



def _bench(capsys, *argv):
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--size", "tiny", "--batch", "2", "--steps", "3", "--warmup", "0", *argv])
    out = run_bench(args)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line) == out  # exactly one JSON line, the returned dict
    return out


@pytest.mark.parametrize("backbone,guidance", [("tiny", "chamfer"), ("sd15", "ot"), ("sd35m", "chamfer"),
                                               ("dit-xl-2", "none")])
def test_tiny_bench_of_every_backbone(capsys, backbone, guidance):
    assert backbone in BACKBONES
    out = _bench(capsys, "--backbone", backbone, "--guidance", guidance, "--every", "1")
    assert out["backbone"] == backbone and out["size"] == "tiny" and out["batch"] == 2 and out["steps"] == 3
    assert out["img_per_s"] > 0 and out["sec_per_img"] == pytest.approx(1 / out["img_per_s"], rel=1e-3)
    assert out["tflops_per_img"] > 0
    parts = out["tflops_per_img_by_part"]
    assert sum(parts.values()) == pytest.approx(out["tflops_per_img"], rel=1e-2)
    assert parts["denoiser_fwd"] > 0
    if guidance == "none":
        assert out["guided_steps"] == 0 and "features_fwd" not in parts
    else:
        assert out["guided_steps"] >= 1 and parts["backward_and_energy"] > 0
    assert out["device"].startswith("cpu") and "mfu" not in out
    assert out["dtype"] == "fp32"


def test_flops_follow_the_configuration(capsys):
    base = _bench(capsys, "--backbone", "dit-xl-2", "--cfg-scale", "1")
    cfg = _bench(capsys, "--backbone", "dit-xl-2", "--cfg-scale", "2")
    longer = _bench(capsys, "--backbone", "dit-xl-2", "--cfg-scale", "1", "--steps", "6")
    d = lambda r: r["tflops_per_img_by_part"]["denoiser_fwd"]  # noqa: E731
    assert d(cfg) == pytest.approx(2 * d(base), rel=1e-3)
    assert d(longer) == pytest.approx(2 * d(base), rel=1e-3)
    # guiding through x0 only skips the denoiser's backward; the tiny decoder is cheaper than the VAE
    model = _bench(capsys, "--backbone", "sd15", "--guidance", "chamfer", "--grad-through", "model")
    x0 = _bench(capsys, "--backbone", "sd15", "--guidance", "chamfer", "--grad-through", "x0")
    taesd = _bench(capsys, "--backbone", "sd15", "--guidance", "chamfer", "--guidance-decoder", "tiny")
    b = lambda r: r["tflops_per_img_by_part"]["backward_and_energy"]  # noqa: E731
    assert b(x0) < b(model)
    assert taesd["tflops_per_img_by_part"]["guide_decode_fwd"] < model["tflops_per_img_by_part"]["guide_decode_fwd"]
    assert taesd["tflops_per_img_by_part"]["final_decode"] == model["tflops_per_img_by_part"]["final_decode"]


def test_fused_projections_and_channels_last_count_the_same_flops(capsys):
    """The speed switches change kernels, not the model: the FLOP count (MFU's numerator) stays."""
    plain = _bench(capsys, "--backbone", "dit-xl-2", "--guidance", "chamfer", "--every", "1")
    fast = _bench(capsys, "--backbone", "dit-xl-2", "--guidance", "chamfer", "--every", "1",
                  "--fuse-projections", "--channels-last")
    assert plain["speedups"] == [] and fast["speedups"] == ["fuse_projections", "channels_last"]
    assert fast["tflops_per_img"] == plain["tflops_per_img"]


def test_gelu_in_gemm_counts_as_its_gemm():
    """cuBLASLt's GELU epilogue op (used on CUDA) is counted like the addmm it replaces."""
    import torch

    from factory.bench import count_flops

    bias, x, w = torch.randn(64), torch.randn(32, 16), torch.randn(16, 64)
    assert count_flops(lambda: torch._addmm_activation(bias, x, w, use_gelu=True)) == 2 * 32 * 16 * 64


def test_profile_says_where_a_batch_spends_its_time(capsys):
    out = _bench(capsys, "--backbone", "sd15", "--guidance", "chamfer", "--every", "1", "--profile", "2")
    prof = out["profile"]
    assert prof["steps"] == 2 and prof["clock"] == "cpu self time"
    assert sum(prof["by_kind"].values()) == pytest.approx(1.0, abs=1e-3)
    assert prof["by_kind"]["conv"] > 0 and prof["by_kind"]["gemm"] > 0  # a UNet and a VAE convolve and project
    shares = [t["share"] for t in prof["top"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0001


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv"),
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopB_TNT", "gemm"),
    ("triton_tem_fused_addmm_0", "gemm"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<72, 128, 64, 4>>", "attention"),
    ("triton_red_fused_native_layer_norm_1", "norm"),
    ("triton_poi_fused_add_mul_2", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
    ("Memcpy HtoD (Pageable -> Device)", "other"),
])
def test_kernel_kinds(name, kind):
    from factory.bench import kernel_kind

    assert kernel_kind(name) == kind


def test_ot_guides_in_the_dmgd_window(capsys):
    out = _bench(capsys, "--backbone", "tiny", "--guidance", "ot", "--steps", "10")
    assert out["guided_steps"] == 4  # i / steps in [0.1, 0.4] = t / T in [0.6, 0.9]: i = 1..4 of 10


def test_peaks():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Tesla T4") is None


def test_flops_only_counts_the_same_flops_on_the_meta_device(capsys):
    argv = ("--backbone", "sd35m", "--guidance", "chamfer", "--every", "1")
    real = _bench(capsys, *argv)
    meta = _bench(capsys, *argv, "--flops-only")
    assert meta["device"].startswith("meta") and meta["img_per_s"] is None and "mfu" not in meta
    for part in ("denoiser_fwd", "final_decode", "guide_decode_fwd", "features_fwd"):
        assert meta["tflops_per_img_by_part"][part] == pytest.approx(real["tflops_per_img_by_part"][part], rel=1e-3)
    # backward: CPU flash attention counts its recompute (2.5x forward, like CUDA's), meta's math path does not
    assert meta["tflops_per_img"] == pytest.approx(real["tflops_per_img"], rel=0.1)
    ot = _bench(capsys, "--backbone", "dit-xl-2", "--guidance", "ot", "--steps", "10", "--flops-only")
    assert ot["guided_steps"] == 4 and ot["tflops_per_img_by_part"]["backward_and_energy"] > 0


def test_cli_prints_exactly_one_json_line(capsys):
    from factory.cli import main

    assert main(["bench", "--backbone", "tiny", "--size", "tiny", "--guidance", "none", "--batch", "2",
                 "--steps", "2", "--warmup", "0", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["backbone"] == "tiny"


def test_gpu_suite_runs_its_grid_at_the_tiny_size(capsys, tmp_path):
    """``factory bench --suite gpu`` on a CPU: the same grid at --size tiny, JSON lines and a markdown table."""
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--suite", "gpu", "--size", "tiny", "--suite-backbones", "dit-xl-2", "--steps", "2", "--warmup", "0",
         "--budget-s", "600", "--out", str(tmp_path)])
    out = run_bench(args)
    modes = [r["mode"] for r in out["rows"]]
    assert modes == ["cfg", "chamfer-cfg-free", "chamfer-cfg-free-taesd", "ot-window"]
    rows = {r["mode"]: r for r in out["rows"]}
    assert all(r["img_per_s"] > 0 and r["tflops_per_img"] > 0 for r in rows.values())
    assert rows["cfg"]["cfg_scale"] > 1 and rows["chamfer-cfg-free"]["cfg_scale"] == 1.0
    assert rows["chamfer-cfg-free-taesd"]["guidance_decoder"] == "tiny"
    # CFG-free halves the denoiser's forward FLOPs; the tiny decoder guides for less than the VAE
    d = lambda m: rows[m]["tflops_per_img_by_part"]["denoiser_fwd"]  # noqa: E731
    assert d("chamfer-cfg-free") == pytest.approx(d("cfg") / 2, rel=1e-3)
    g = lambda m: rows[m]["tflops_per_img_by_part"]["guide_decode_fwd"]  # noqa: E731
    assert g("chamfer-cfg-free-taesd") < g("chamfer-cfg-free")
    lines = (tmp_path / "suite.jsonl").read_text().splitlines()
    assert [json.loads(x)["mode"] for x in lines] == modes
    table = (tmp_path / "suite.md").read_text()
    assert "| dit-xl-2 | chamfer-cfg-free-taesd | False |" in table and "wall vs cfg" in table


def test_gpu_suite_skips_rows_past_its_budget(capsys):
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--suite", "gpu", "--size", "tiny", "--suite-backbones", "dit-xl-2,sd15", "--steps", "2", "--warmup", "0",
         "--budget-s", "0"])
    out = run_bench(args)
    assert out["rows"] and all("skipped" in r for r in out["rows"])
