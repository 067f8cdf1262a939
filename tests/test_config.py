import inspect
from pathlib import Path

import pytest
import yaml

from factory.config import (
    ChamferParams, ConfigError, LowDensityParams, OTParams, SoftLabelsConfig, from_dict, load_config, parse_overrides,
)

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


def test_quickstart_config_validates():
    cfg = load_config("jobs/digits.yaml")
    assert cfg.name == "digits"
    assert "cfg" in cfg.recipes and cfg.recipes["cfg"].cfg_scale == 2.0


@pytest.mark.parametrize(
    "data, message",
    [
        ({"sampling": {"stepz": 3}}, "unknown key sampling.'stepz'"),
        ({"sampling": {"steps": "ten"}}, "sampling.steps: expected an integer"),
        ({"sampling": {"steps": 0}}, "sampling.steps: must be >= 1"),
        ({"backbone": {"name": "sd99"}}, "backbone.name: unknown value 'sd99'"),
        ({"recipes": {"x": {"energies": [{"name": "magic"}]}}}, "recipes.x.energies[0].name: unknown value 'magic'"),
        ({"recipes": {"x": {"energies": [{"weight": 1.0}]}}}, "missing required key 'name'"),
        ({"recipes": {"x": {"energies": [{"name": "chamfer", "params": {"references": "best"}}]}}},
         "recipes.x.energies[0].params.references: unknown value 'best'; expected one of 'random' or 'kmeans'"),
        ({"recipes": {"x": {"cfg_scale": 0.5}}}, "recipes.x.cfg_scale: must be >= 1.0"),
        ({"executor": {"num_actors": [3, 1]}}, "executor.num_actors"),
        ({"output": {"formats": ["csv"]}}, "output.formats[0]: unknown value 'csv'"),
        ({"recipes": {}}, "at least one recipe"),
        ({"seed": 1.5}, "seed: expected an integer"),
        ({"recipes": {"x": {"soft_labels": {"baseline": "null"}}}}, "recipes.x.soft_labels.baseline: unknown value"),
        # each energy's params are typed by its name
        ({"recipes": {"x": {"energies": [{"name": "chamfer", "params": {"kk": 3}}]}}},
         "unknown key recipes.x.energies[0].params.'kk'; allowed keys: balance, coverage_weight, fidelity_weight, k"),
        ({"recipes": {"x": {"energies": [{"name": "chamfer"}, {"name": "ot", "params": {"k": 3}}]}}},
         "unknown key recipes.x.energies[1].params.'k'; allowed keys: K, cost_scale,"),
        ({"recipes": {"x": {"energies": [{"name": "ot", "params": {"K": 0}}]}}},
         "recipes.x.energies[0].params.K: must be >= 1, got 0"),
        ({"recipes": {"x": {"energies": [{"name": "ot", "params": {"reg": 0}}]}}}, "params.reg: must be > 0.0, got 0"),
        ({"recipes": {"x": {"energies": [{"name": "ot", "params": {"method": "exact"}}]}}},
         "params.method: unknown value 'exact'; expected one of 'sinkhorn' or 'sinkhorn_log'"),
        ({"recipes": {"x": {"energies": [{"name": "ot", "params": {"cost_scale": -1}}]}}},
         "params.cost_scale: expected a positive number, 'mean' or 'max', got -1"),
        ({"recipes": {"x": {"energies": [{"name": "lowdensity", "params": {"beta": 1.0, "tau": 0}}]}}},
         "recipes.x.energies[0].params.tau: must be > 0"),
        ({"recipes": {"x": {"energies": [{"name": "chamfer", "params": {"balance": 1}}]}}},
         "recipes.x.energies[0].params.balance: expected true or false, got 1"),
        ({"recipes": {"x": {"energies": [{"name": "chamfer", "window": [0.6, 0.2]}]}}},
         "recipes.x.energies[0].window: expected [start, end]"),
        ({"recipes": {"x": {"energies": [{"name": "chamfer", "every": 0}]}}},
         "recipes.x.energies[0].every: must be >= 1"),
        # choices name the allowed values; bounds say the bound and the value
        ({"backbone": {"name": "sd99"}}, "expected one of 'tiny', 'sd15', 'sd35m' or 'dit-xl-2'"),
        ({"recipes": {"x": {"grad_through": "x1"}}},
         "recipes.x.grad_through: unknown value 'x1'; expected one of 'model' or 'x0'"),
        ({"downstream": {"model": "vgg"}}, "downstream.model: unknown value 'vgg'"),
        ({"sampling": {"eta": -1}}, "sampling.eta: must be >= 0.0, got -1"),
        ({"recipes": {"x": {"init_strength": 0}}}, "recipes.x.init_strength: must be > 0"),
        ({"recipes": {"x": {"finetune": {"batch_size": 1}}}}, "recipes.x.finetune.batch_size: must be >= 2, got 1"),
        ({"recipes": {"x": {"finetune": {"p_uncond": 1.0}}}}, "recipes.x.finetune.p_uncond: must be < 1"),
        ({"recipes": {"x": {"soft_labels": {"refine_until": 0.95}}}},
         "recipes.x.soft_labels.refine_until: must be below"),
        ({"recipes": {"a b": {}}}, "recipes.a b: recipe names may hold"),
        ({"sampling": {"eta": "fast"}}, "sampling.eta: expected a finite number, got 'fast'"),
        # backbone and feature-space options are checked against the backbone's and the feature space's
        ({"backbone": {"name": "tiny", "options": {"dtype": "fp32"}}},
         "unknown key backbone.options.'dtype'; allowed keys: channels_last, lora, mode"),
        ({"backbone": {"name": "sd15", "checkpoint": "x", "options": {"dtype": "fp8"}}},
         "backbone.options.dtype: unknown value 'fp8'"),
        ({"backbone": {"name": "sd15", "checkpoint": "x", "options": {"prompt_template": "a {name}"}}},
         "backbone.options.prompt_template: must contain '{class_name}'"),
        ({"backbone": {"name": "sd35m", "checkpoint": "x", "options": {"scheduler": "ddim"}}},
         "backbone.options.scheduler: unknown value 'ddim'"),
        ({"backbone": {"name": "dit-xl-2", "checkpoint": "x", "options": {"resolution": [256]}}},
         "backbone.options.resolution: expected a positive integer or [height, width]"),
        ({"features": {"name": "cnn", "options": {"work_size": 16}}},
         "unknown key features.options.'work_size'; allowed keys: none"),
        ({"features": {"name": "dinov2", "options": {"image_size": 0}}}, "features.options.image_size: must be >= 1"),
    ],
)
def test_bad_configs_name_the_problem(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    assert message in str(e.value)


def test_cfg_scale_below_one_exits_2_naming_the_key(capsys):
    from factory.cli import main

    assert main(["run", "jobs/digits.yaml", "--set", "recipes.lowdensity.cfg_scale=0.5"]) == 2
    err = capsys.readouterr().err
    assert "recipes.lowdensity.cfg_scale: must be >= 1.0" in err and "got 0.5" in err
    assert main(["plan", "jobs/digits.yaml", "--set", "recipes.cfg.cfg_scale=0.99"]) == 2
    assert "recipes.cfg.cfg_scale" in capsys.readouterr().err


def test_overrides_parse_yaml_scalars():
    cfg = from_dict({}, parse_overrides(["sampling.steps=7", "executor.num_actors=[2,3]", "recipes.cfg.cfg_scale=1"]))
    assert cfg.sampling.steps == 7 and cfg.executor.num_actors == [2, 3] and cfg.recipes["cfg"].cfg_scale == 1.0
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_overrides(["nonsense"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_error_is_named_at_once():
    with pytest.raises(ConfigError) as e:
        from_dict({"sampling": {"steps": 0}, "output": {"quality": 0},
                   "recipes": {"x": {"energies": [{"name": "chamfer", "params": {"kk": 3}}]}}})
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and lines[0].startswith("sampling.steps") and "params.'kk'" in lines[2]


def test_candidates_need_exactly_one_chamfer_or_ot_energy():
    chamfer = {"name": "chamfer", "params": {"k": 8}}
    assert from_dict({"recipes": {"x": {"candidates": 3, "energies": [chamfer]}}}).recipes["x"].candidates == 3
    assert from_dict({"recipes": {"x": {"candidates": 2, "energies": [{"name": "ot"}]}}}).recipes["x"].candidates == 2
    for energies in ([], [{"name": "lowdensity"}], [chamfer, {"name": "ot"}]):
        with pytest.raises(ConfigError, match=r"recipes.x.candidates: .*exactly one energy, chamfer or ot"):
            from_dict({"recipes": {"x": {"candidates": 3, "energies": energies}}})
    with pytest.raises(ConfigError, match="recipes.x.candidates"):
        from_dict({"recipes": {"x": {"candidates": 0, "energies": [chamfer]}}})


def test_an_energy_param_typo_fails_at_load_and_exits_2(tmp_path, capsys):
    from factory.cli import main

    path = tmp_path / "job.yaml"
    path.write_text("recipes:\n  chamfer:\n    energies:\n      - {name: chamfer, params: {kk: 3}}\n")
    with pytest.raises(ConfigError, match=r"recipes.chamfer.energies\[0\].params.'kk'"):
        load_config(path)
    assert main(["plan", str(path)]) == 2
    assert "unknown key recipes.chamfer.energies[0].params.'kk'; allowed keys:" in capsys.readouterr().err


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path):
    path = tmp_path / "job.yaml"  # PyYAML reads 1e-4 (no dot) as the string "1e-4"
    path.write_text("recipes:\n  x:\n    finetune: {lr: 1e-4}\n"
                    "    energies: [{name: ot, weight: 5e-2, params: {reg: 1e-1}}]\n")
    r = load_config(path).recipes["x"]
    assert r.finetune.lr == 1e-4 and r.energies[0].weight == 0.05 and r.energies[0].params.reg == 0.1
    assert from_dict({}, parse_overrides(["sampling.eta=1e-2"])).sampling.eta == 0.01


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_job_loads_and_round_trips(path):
    cfg = load_config(path)
    assert from_dict(cfg.to_dict()) == cfg  # what the actors and the run's record rebuild


def test_options_keep_the_keys_given_and_params_get_defaults():
    cfg = load_config("jobs/imagenet1k_10x_dit.yaml")
    assert cfg.backbone.options == {"dtype": "bf16", "gradient_checkpointing": True, "class_ids": None}
    (e,) = cfg.recipes["chamfer"].energies
    assert (e.params.k, e.params.balance) == (32, False)  # the default where the job does not say


def test_param_defaults_are_the_guidance_modules_defaults():
    from factory import guidance
    from factory.guidance import softlabel

    def defaults(fn, model):
        sig = inspect.signature(fn).parameters
        return {k: sig[k].default for k in model.model_fields if k in sig and k != "baseline"}, model().model_dump()

    for fn, model, n in [(guidance.ChamferEnergy.__init__, ChamferParams, 3),
                         (guidance.OTEnergy.__init__, OTParams, 6),
                         (guidance.LowDensityEnergy.__init__, LowDensityParams, 4),
                         (softlabel.soft_label_parts, SoftLabelsConfig, 5)]:
        given, ours = defaults(fn, model)
        assert len(given) == n and all(ours[k] == v for k, v in given.items()), (model, given, ours)
    assert ChamferParams().k == inspect.signature(guidance.ChamferEnergy.from_features).parameters["k"].default
    assert OTParams().K == inspect.signature(guidance.OTEnergy.from_features).parameters["K"].default


ANCHORED = """
recipes:
  a: &a
    cfg_scale: 1.0
    energies: [{name: chamfer, weight: 0.1, every: 1, params: {k: 8}}]
  b: *a
"""


def test_a_star_in_an_override_sets_every_recipe():
    job = load_config(Path(__file__).parents[1] / "jobs" / "digits_ipc.yaml", ["recipes.*.images_per_class=50"])
    assert {r.images_per_class for r in job.recipes.values()} == {50} and len(job.recipes) == 13
    with pytest.raises(ConfigError, match=r"recipes\.\*\.x: .*nothing"):
        from_dict({"recipes": {}}, parse_overrides(["recipes.*.x=1"]))
    with pytest.raises(ConfigError, match="'name' is not a mapping"):
        from_dict({"name": "x"}, parse_overrides(["*.steps=1"]))


def test_an_override_indexes_lists_and_reaches_one_recipe_only():
    data = yaml.safe_load(ANCHORED)
    job = from_dict(data, parse_overrides(["recipes.a.energies.0.params.k=50"]))
    assert job.recipes["a"].energies[0].params.k == 50
    assert job.recipes["b"].energies[0].params.k == 8  # b shares a's list through the anchor in the YAML
    assert data["recipes"]["a"]["energies"][0]["params"]["k"] == 8  # the caller's data is left as it was
    both = from_dict(data, parse_overrides(["recipes.*.energies.*.weight=0.5", "recipes.b.energies.-1.every=3"]))
    assert [r.energies[0].weight for r in both.recipes.values()] == [0.5, 0.5]
    assert (both.recipes["a"].energies[0].every, both.recipes["b"].energies[0].every) == (1, 3)
    with pytest.raises(ConfigError, match=r"energies\.1\.weight: index 1 is out of range \(the list there has 1"):
        from_dict(data, parse_overrides(["recipes.a.energies.1.weight=1"]))
    with pytest.raises(ConfigError, match=r"'first' is not an index"):
        from_dict(data, parse_overrides(["recipes.a.energies.first.weight=1"]))
