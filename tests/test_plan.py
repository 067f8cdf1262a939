import time

from factory.plan import Plan, RecipePlan, images_per_class, shard_seed


def test_plan_covers_every_image_once():
    plan = Plan([RecipePlan("a", 10, 4), RecipePlan("b", 3, 5)], [0, 2], ["x", "y", "z"], seed=1)
    assert len(plan) == 2 * 3 + 2 * 1
    shards = list(plan)
    assert [s.shard_id for s in shards] == list(range(len(plan)))
    for recipe, per_class in (("a", 10), ("b", 3)):
        for label in (0, 2):
            got = [s for s in shards if s.recipe == recipe and s.label == label]
            assert sum(s.num_images for s in got) == per_class
            keys = [s.key(i) for s in got for i in range(s.num_images)]
            assert len(set(keys)) == per_class and all("." not in k for k in keys)
    assert shards[0].class_name == "x" and shards[3].class_name == "z"
    assert len({s.seed for s in shards}) == len(shards)
    assert len({(s.recipe, s.name) for s in shards}) == len(shards)
    assert list(plan.recipe_range("b")) == [6, 7]


def test_seeds_are_a_function_of_config_and_shard():
    assert shard_seed(0, "cfg", 3, 1) == shard_seed(0, "cfg", 3, 1)
    assert shard_seed(0, "cfg", 3, 1) != shard_seed(1, "cfg", 3, 1)
    assert 0 <= shard_seed(5, "x", 0, 0) < 2**63


def test_ten_x_imagenet_plan():
    t0 = time.perf_counter()
    n = images_per_class(10.0, None, 1_281_167, 1000)
    plan = Plan([RecipePlan("chamfer", n, 1000)], list(range(1000)), [f"n{i:08d}" for i in range(1000)], seed=0)
    last = plan.shard(len(plan) - 1)
    elapsed = time.perf_counter() - t0
    assert plan.num_images >= 12_811_670
    assert last.label == 999 and last.first_image + last.num_images == n
    print(f"13M-image plan: {len(plan)} shards in {elapsed * 1e3:.2f} ms")


def test_images_per_class_one_x():
    assert images_per_class(1.0, None, 1347, 10) == 135
    assert images_per_class(1.0, 7, 1347, 10) == 7


# ----------------------------------------------------------------------------- factory plan: sizes, hours, cost

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from factory.cli import main  # noqa: E402
from factory.config import ConfigError, from_dict  # noqa: E402
from factory.plan import (  # noqa: E402
    DEVICES, estimate, guided_schedule, plan_for_config, recipe_tflops,
)

ROOT = Path(__file__).resolve().parents[1]


def _cfg(backbone="sd15", steps=25, **recipe):
    return from_dict({"backbone": {"name": backbone, "checkpoint": "x"}, "features": {"name": "dinov2"},
                      "data": {"source": "parquet", "root": "s3://b/d", "num_classes": 10},
                      "sampling": {"steps": steps, "shard_size": 10}, "executor": {"num_gpus": 1, "num_actors": [1, 4]},
                      "recipes": {"r": {"images_per_class": 100, **recipe}}})


CHAMFER = [{"name": "chamfer", "every": 5, "params": {"k": 32}}]
OT = [{"name": "ot", "window": [0.1, 0.4], "params": {"K": 10}}]


@pytest.mark.parametrize("backbone, steps, recipe, bench_tflops", [
    # `factory bench --size full --flops-only` counts (docs/benchmarks.md, and this module's checks)
    ("sd15", 25, {"cfg_scale": 2.0}, 42.7),
    ("sd15", 25, {"cfg_scale": 2.0, "energies": CHAMFER}, 78.9),
    ("sd15", 25, {"cfg_scale": 2.0, "energies": CHAMFER, "grad_through": "x0"}, 69.7),
    ("sd15", 40, {"cfg_scale": 1.0, "energies": CHAMFER}, 85.18),
    ("sd15", 25, {"cfg_scale": 2.0, "energies": OT}, 100.6),
    ("sd35m", 25, {"cfg_scale": 2.0, "energies": CHAMFER}, 836.8),
    ("sd35m", 25, {"cfg_scale": 1.0, "energies": CHAMFER}, 478.2),
    ("dit-xl-2", 25, {"cfg_scale": 2.0}, 12.5),
    ("dit-xl-2", 25, {"cfg_scale": 1.0, "energies": CHAMFER}, 15.67),
    ("dit-xl-2", 50, {"cfg_scale": 1.5, "energies": CHAMFER}, 45.03),
    ("dit-xl-2", 50, {"cfg_scale": 2.0, "energies": OT}, 57.4),
])
def test_flop_model_matches_the_bench_counts(backbone, steps, recipe, bench_tflops):
    cfg = _cfg(backbone, steps, **recipe)
    tflops, notes = recipe_tflops(cfg, cfg.recipes["r"])
    assert tflops == pytest.approx(bench_tflops, rel=0.01) and not notes


def test_self_recurrence_repeats_the_guided_steps_cost():
    from factory.plan import BACKBONE_TFLOPS

    every_step = [{"name": "chamfer", "every": 1, "params": {"k": 32}}]
    final = BACKBONE_TFLOPS["dit-xl-2"]["final_decode"]
    once, thrice = (recipe_tflops(c, c.recipes["r"])[0] for c in (
        _cfg("dit-xl-2", 25, cfg_scale=1.0, energies=every_step),
        _cfg("dit-xl-2", 25, cfg_scale=1.0, energies=every_step, recurrence=3)))
    assert thrice - final == pytest.approx(3 * (once - final))  # every step guided: all of it three times
    plain = _cfg("dit-xl-2", 25, cfg_scale=2.0, recurrence=3)
    assert recipe_tflops(plain, plain.recipes["r"])[0] == pytest.approx(12.5, rel=0.01)  # nothing to repeat


def test_candidates_multiply_the_whole_sampling_cost():
    from factory.plan import BACKBONE_TFLOPS

    every_step = [{"name": "chamfer", "every": 1, "params": {"k": 32}}]
    one, three = (recipe_tflops(c, c.recipes["r"])[0] for c in (
        _cfg("dit-xl-2", 25, cfg_scale=1.0, energies=every_step),
        _cfg("dit-xl-2", 25, cfg_scale=1.0, energies=every_step, candidates=3)))
    assert three == pytest.approx(3 * (one + BACKBONE_TFLOPS["dit-xl-2"]["features"]))  # + one embedding each


def test_guided_schedule_follows_the_sampler():
    cfg = _cfg(steps=25, energies=CHAMFER)
    assert guided_schedule(25, cfg.recipes["r"]) == (25, 5, 5)  # i = 0, 5, 10, 15, 20
    assert guided_schedule(50, _cfg(energies=OT).recipes["r"]) == (50, 16, 16)  # i / 50 in [0.1, 0.4]
    both = _cfg(energies=CHAMFER + [{"name": "lowdensity", "params": {"alpha": 1.0, "beta": 1.0}}]).recipes["r"]
    assert guided_schedule(10, both) == (10, 10, 2 + 2 * 10)  # low-density: two terms, every step
    assert guided_schedule(20, _cfg(init_strength=0.5, energies=CHAMFER).recipes["r"]) == (10, 2, 2)


def test_estimate_hours_and_cost_from_a_given_rate_and_price():
    cfg = _cfg("dit-xl-2", energies=CHAMFER)
    est = estimate(cfg, gpu="a100", img_per_s=2.5, price_per_gpu_hour=1.5)
    assert (est["classes"], est["shards"], est["images"]) == (10, 100, 1000)
    (row,) = est["recipes"]
    assert row["rate"] == "given" and row["img_per_s"] == 2.5
    assert est["device_hours"] == pytest.approx(1000 / 2.5 / 3600)
    assert est["cost"] == {"given": pytest.approx(1000 / 2.5 / 3600 * 1.5)}
    assert est["parallel_devices"] == 4 and est["wall_hours"] == pytest.approx(est["device_hours"] / 4)


def test_estimate_from_flops_on_each_gpu_and_default_prices():
    cfg = _cfg("dit-xl-2", steps=50, cfg_scale=1.5, energies=CHAMFER)
    for key, (_, peak, on_demand, spot, unit) in DEVICES.items():
        if peak is None:
            continue
        est = estimate(cfg, gpu=key.upper(), mfu=0.5)
        (row,) = est["recipes"]
        assert row["rate"] == "estimate" and "ESTIMATE" not in row["rate_source"]
        assert row["img_per_s"] == pytest.approx(peak * 0.5 / 45.03, rel=0.01)
        assert est["cost"]["on_demand"] == pytest.approx(est["device_hours"] * on_demand)
        assert est["prices"]["spot_assumed"] == (spot is None) and est["cost"]["spot"] < est["cost"]["on_demand"]


def test_declared_sizes_plan_without_data_like_the_data():
    data = {"source": "digits", "num_classes": 10, "train_size": 1347}
    recipes = {"a": {"scale": 2.0}, "b": {"images_per_class": 7}}
    declared = from_dict({"data": data, "sampling": {"shard_size": 100}, "recipes": recipes})
    read = from_dict({"data": {"source": "digits"}, "sampling": {"shard_size": 100}, "recipes": recipes})
    p1, p2 = plan_for_config(declared), plan_for_config(read)
    assert (len(p1), p1.num_images) == (len(p2), p2.num_images) == (10 * 3 + 10, 10 * 270 + 70)
    subset = from_dict({"data": {"source": "digits", "classes": ["3", "5"]}, "recipes": {"x": {"images_per_class": 4}}})
    assert plan_for_config(subset).num_images == 8


@pytest.mark.parametrize("data, message", [
    ({"num_classes": 0}, "data.num_classes: must be >= 1"),
    ({"train_size": -5}, "data.train_size: must be >= 1"),
    ({"num_classes": 2, "classes": ["a", "b", "c"]}, "more than data.num_classes = 2"),
])
def test_declared_sizes_are_validated(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"data": {"source": "digits", **data}})


def _job(tmp_path, data) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_cli_plan_digits_counts_and_measured_rate(capsys):
    assert main(["plan", str(ROOT / "jobs" / "digits.yaml")]) == 0
    out = capsys.readouterr().out
    assert "40 shards, 5,400 images" in out and "measured rate" in out and "vCPU-hours" in out
    assert main(["plan", str(ROOT / "jobs" / "digits.yaml"), "--json", "--img-per-s", "10",
                 "--price-per-gpu-hour", "2"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["shards"] == 40 and est["images"] == 5400
    assert est["device_hours"] == pytest.approx(5400 / 10 / 3600) and est["cost"]["given"] == pytest.approx(0.3)


@pytest.mark.parametrize("args, message", [
    (["--gpu", "tpu-v9"], "--gpu: unknown GPU 'tpu-v9'; known: h100"),
    (["--img-per-s", "-3"], "--img-per-s: must be a positive number"),
    (["--img-per-s", "0"], "--img-per-s: must be a positive number"),
    (["--price-per-gpu-hour", "-1"], "--price-per-gpu-hour: must be a number >= 0"),
    (["--mfu", "1.5"], "--mfu: must be in (0, 1]"),
    (["--gpu", "h100"], "no images/s for backbone 'tiny'"),  # no GPU figure, no FLOP model: asks for a rate
])
def test_cli_plan_bad_input_exits_2_with_a_clear_message(args, message, capsys):
    assert main(["plan", str(ROOT / "jobs" / "digits.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("factory: error: ") and message in err


def test_cli_plan_bad_config_exits_2(tmp_path, capsys):
    assert main(["plan", _job(tmp_path, {"data": {"source": "digits", "num_classes": -1}})]) == 2
    assert "data.num_classes" in capsys.readouterr().err


def test_cli_plan_prints_the_13m_image_job():
    """`factory plan` on 12.8M images, in a fresh interpreter (its speed is a benchmark figure:
    docs/benchmarks.md)."""
    job = str(ROOT / "jobs" / "imagenet1k_10x_dit.yaml")
    code = f"import sys, factory.cli; sys.exit(factory.cli.main(['plan', {job!r}, '--gpu', 'a100']))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "12,812,000 images" in proc.stdout and "13,000 shards" in proc.stdout and "GPU-hours" in proc.stdout
    assert "ESTIMATED rate" in proc.stdout and "a100" in proc.stdout


def test_h200_and_h100_rates_come_from_the_measured_mfu_unless_an_mfu_is_given():
    from factory.plan import MEASURED_MFU

    cfg = _cfg("dit-xl-2", steps=50, cfg_scale=1.5, energies=CHAMFER)
    for gpu in ("h200", "h100"):
        (row,) = estimate(cfg, gpu=gpu)["recipes"]
        assert row["rate"] == "measured-mfu" and "suite gpu" in row["rate_source"]
        assert row["img_per_s"] == pytest.approx(989.0 * MEASURED_MFU["dit-xl-2"]["vae"] / 45.03, rel=0.01)
    (row,) = estimate(cfg, gpu="h200", mfu=0.5)["recipes"]  # an explicit --mfu is the user's assumption
    assert row["rate"] == "estimate"
    (row,) = estimate(cfg, gpu="a100")["recipes"]  # nothing measured on an A100
    assert row["rate"] == "estimate"


def test_factory_plan_runs_without_importing_torch():
    """``factory plan`` is for a laptop before a cluster exists: it must not pay torch's import."""
    code = ("import contextlib, io, sys\nfrom factory.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['plan', 'jobs/digits.yaml'])\n"
            "print('torch' in sys.modules)")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"
