import pytest

from factory.config import ConfigError, from_dict, load_config, parse_overrides


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
        ({"recipes": {"x": {"cfg_scale": 0.5}}}, "recipes.x.cfg_scale: must be >= 1.0"),
        ({"executor": {"num_actors": [3, 1]}}, "executor.num_actors"),
        ({"output": {"formats": ["csv"]}}, "output.formats[0]: unknown value 'csv'"),
        ({"recipes": {}}, "at least one recipe"),
        ({"seed": 1.5}, "seed: expected an integer"),
        ({"recipes": {"x": {"soft_labels": {"baseline": "null"}}}}, "recipes.x.soft_labels.baseline: unknown value"),
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
