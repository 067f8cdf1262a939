"""`factory run`'s console: bars and one summary table; Ray's and Ray Train's chatter in no console line.

The CLI runs in a subprocess (a Ray of its own, as a user starts it) on a tiny digits config with a
downstream classifier, so Ray Train's controller and workers run too.
"""

import os
import subprocess
import sys

import pytest
import yaml

from factory.console import summary_table

TINY = {
    "name": "console",
    "seed": 5,
    "data": {"source": "digits"},
    "sampling": {"steps": 3, "shard_size": 4},
    "executor": {"num_actors": [1, 1]},
    "downstream": {"enabled": True, "epochs": 2, "batch_size": 8, "num_workers": 1, "train_on": ["synthetic"]},
    "recipes": {"cfg": {"cfg_scale": 2.0, "images_per_class": 4}},
}

CHATTER = [
    "Failed to query Ray Train Controller actor state",  # Ray Train V2's PG cleaner without the State API
    "Reporting training result",  # a Ray Train worker's per-epoch report (with every metric)
    "TrainingReport(",
    "Checkpoint successfully created",
    "constructor arguments in the object store",  # core worker warning for restartable actors
    "Token authentication is enabled",
    "Progress bars disabled",
    "(RayTrainWorker", "(TrainController", "(PlacementGroupCleaner", "(MapWorker",
]


@pytest.mark.integration
def test_quiet_console_shows_bars_and_a_summary_table(tmp_path):
    config = tmp_path / "console.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TQDM_DISABLE")}
    r = subprocess.run([sys.executable, "-m", "factory.cli", "run", str(config), "--output", str(out)],
                       capture_output=True, text=True, env=env, timeout=1200)
    console = r.stdout + r.stderr
    assert r.returncode == 0, console[-4000:]
    for line in CHATTER:
        assert line not in console, f"{line!r} on the console:\n{console[-4000:]}"
    for stage in ("sampling", "scor", "downstream"):  # one bar per stage
        assert stage in r.stderr, r.stderr[-2000:]
    assert "img/s" in r.stderr and "10/10 shards" in r.stderr
    table = r.stdout
    assert "precision" in table and "downstream acc." in table and "real (train)" in table
    assert any(line.startswith("cfg ") for line in table.splitlines()), table
    assert f"report: {out}/report.html" in table and f"log:    {out}/factory.log" in table
    assert "wall: " in table and "sampling" in table
    assert len(table.splitlines()) < 15  # fits on a screen
    log = (out / "factory.log").read_text()
    assert "factory.run" in log and "downstream cfg-synthetic: accuracy" in log


def test_summary_table_lists_every_set_and_the_stage_times():
    metrics = {
        "real": {"num_images": 1347, "precision": 0.959, "recall": 0.936, "coverage": 1.0, "fd": 0.068,
                 "hardness_mean": -123.8, "downstream": {"real": 0.962}},
        "lowdensity": {"num_images": 1350, "precision": 0.816, "recall": 0.88, "coverage": 0.809, "fd": 1.401,
                       "hardness_mean": -58.4, "downstream": {"synthetic": 0.956}},
    }
    text = summary_table("runs/digits", metrics, {"finetune": 0.01, "sampling": 140.0, "scoring": 3.2,
                                                  "downstream": 130.0, "total": 297.0},
                         "runs/digits/report.html", "runs/digits/factory.log")
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["set", "images"] and lines[0].endswith("downstream acc.")
    real, low = lines[2], lines[3]
    assert real.startswith("real (train)") and "1,347" in real and real.endswith("0.962")
    assert low.startswith("lowdensity") and "-58.4" in low and "0.816" in low and low.endswith("0.956")
    assert "wall: 4 m 57 s (sampling 2 m 20 s, scoring 3 s, downstream 2 m 10 s)" in text  # no finetune: 0 s
    assert "report: runs/digits/report.html" in text


def test_seconds_round_to_whole_seconds_before_minutes():
    from factory.console import _seconds

    assert [_seconds(x) for x in (None, 3.4, 89.4, 179.6, 297.0)] == ["–", "3 s", "89 s", "3 m 00 s", "4 m 57 s"]


def test_summary_table_shows_the_mean_and_std_over_seeds_and_the_random_real_row():
    metrics = {"random_real": {"num_images": 100, "downstream": {"real": 0.912}, "downstream_std": {"real": 0.014}},
               "cfg": {"num_images": 100, "precision": 0.99, "downstream": {"synthetic": 0.93},
                       "downstream_std": {"synthetic": 0.008}}}
    lines = summary_table("out", metrics, {"total": 60.0}).splitlines()
    assert lines[2].startswith("random_real") and lines[2].endswith("0.912 ± 0.014") and " – " in lines[2]
    assert lines[3].startswith("cfg") and lines[3].endswith("0.930 ± 0.008")
