"""`factory verify` and healing: a committed shard corrupted after the fact (Parquet and WebDataset, on a local
disk and on the S3 test endpoint) is named by verify and re-made by the next run, with the bytes it had."""

import hashlib
import json
import os
import shutil

import fsspec
import pytest

from factory.cli import main
from factory.verify import verify

s3fs = pytest.importorskip("s3fs")

SHARDS = [f"c{c:05d}-s{i:05d}" for c in (1, 4, 7) for i in (0, 1)]
SUFFIX = {"parquet": ".parquet", "webdataset": ".tar"}


@pytest.fixture(scope="module")
def made(s3, tiny_run):
    """The session's tiny real run (S3 settings first, so that the reruns' Ray workers reach the endpoint);
    each test corrupts a copy of it."""
    config, out = tiny_run
    markers = {n: json.load(open(f"{out}/cfg/_stats/{n}.json")) for n in SHARDS}
    return config, out, markers


def _flip(data: bytes) -> bytes:
    """Same size, a few bytes in the middle inverted."""
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 8]) + data[mid + 8:]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verify_json(capsys, output, *extra):
    code = main(["verify", output, "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def _assert_healed(fs, root, markers):
    """Every shard's files have the sha256 of the unfaulted run's marker, and the markers are the same."""
    for name, marker in markers.items():
        assert json.loads(fs.cat_file(f"{root}/cfg/_stats/{name}.json")) == marker, name
        for kind, want in marker["files"].items():
            assert _sha(fs.cat_file(f"{root}/cfg/{kind}/{name}{SUFFIX[kind]}")) == want["sha256"], (name, kind)


def test_clean_run_verifies(made, capsys):
    _, out, _ = made
    code, res = _verify_json(capsys, out)
    assert code == 0 and res["ok"] and res["shards_intact"] == res["shards_planned"] == 6
    assert res["bad"] == [] and res["missing"] == [] and all(not r["classes_short"] for r in res["recipes"])
    assert main(["verify", out]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")


def test_truncated_missing_and_incomplete_shards_are_named(made, tmp_path, capsys):
    _, out, _ = made
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    with open(f"{copy}/cfg/parquet/{SHARDS[0]}.parquet", "r+b") as f:  # a copy cut short
        f.truncate(100)
    os.remove(f"{copy}/cfg/webdataset/{SHARDS[1]}.tar")
    os.remove(f"{copy}/cfg/_stats/{SHARDS[2]}.json")  # not complete: missing, not bad
    code, res = _verify_json(capsys, copy)
    assert code == 1 and not res["ok"]
    bad = {b["shard"]: " ".join(b["problems"]) for b in res["bad"]}
    assert set(bad) == {f"cfg/{SHARDS[0]}", f"cfg/{SHARDS[1]}"}
    assert "100 bytes" in bad[f"cfg/{SHARDS[0]}"] and "webdataset file missing" in bad[f"cfg/{SHARDS[1]}"]
    assert res["missing"] == [f"cfg/{SHARDS[2]}"]
    assert res["recipes"][0]["classes_short"] == {"1": 0, "4": 1}
    assert main(["verify", copy]) == 1
    text = capsys.readouterr().out
    assert f"BAD cfg/{SHARDS[0]}" in text and f"BAD cfg/{SHARDS[1]}" in text and f"cfg/{SHARDS[2]}" in text


def test_local_corruption_is_named_and_run_verify_remakes_it(made, tmp_path, capsys):
    config, out, markers = made
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    bad = {SHARDS[2]: "parquet", SHARDS[5]: "webdataset"}
    for name, kind in bad.items():
        path = f"{copy}/cfg/{kind}/{name}{SUFFIX[kind]}"
        data = open(path, "rb").read()
        open(path, "wb").write(_flip(data))
    untouched = {p: os.stat(p).st_mtime_ns for kind in SUFFIX for n in SHARDS if n not in bad
                 for p in [f"{copy}/cfg/{kind}/{n}{SUFFIX[kind]}"]}

    code, res = _verify_json(capsys, copy)
    assert code == 1
    problems = {b["shard"]: " ".join(b["problems"]) for b in res["bad"]}
    assert set(problems) == {f"cfg/{n}" for n in bad}
    for name, kind in bad.items():
        assert f"{kind} file's sha256 differs" in problems[f"cfg/{name}"]

    assert main(["run", config, "--output", copy, "--quiet", "--verify"]) == 0
    capsys.readouterr()
    run = json.load(open(f"{copy}/run.json"))
    assert run["shards"] == {"planned": 6, "made": 2, "already_complete": 4}  # exactly the two, once
    assert run["healed"] == [f"cfg/{n}" for n in sorted(bad)]
    _assert_healed(fsspec.filesystem("file"), copy, markers)
    assert {p: os.stat(p).st_mtime_ns for p in untouched} == untouched  # the intact shards were not rewritten
    assert _verify_json(capsys, copy)[0] == 0


def test_s3_corruption_is_named_repaired_and_remade(made, capsys):
    config, out, markers = made
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = "factory-test/verify/out"
    fs.put(out, root, recursive=True)
    uri = f"s3://{root}"
    assert _verify_json(capsys, uri)[0] == 0
    bad = {SHARDS[0]: "webdataset", SHARDS[3]: "parquet"}
    for name, kind in bad.items():
        path = f"{root}/cfg/{kind}/{name}{SUFFIX[kind]}"
        fs.pipe_file(path, _flip(fs.cat_file(path)))

    code, res = _verify_json(capsys, uri, "--repair")
    assert code == 1
    assert [b["shard"] for b in res["bad"]] == [f"cfg/{n}" for n in sorted(bad)]
    assert res["repaired"] == [f"cfg/{n}" for n in sorted(bad)]
    fs.invalidate_cache()
    for name in bad:  # repair un-completes them: marker and files gone
        assert not fs.exists(f"{root}/cfg/_stats/{name}.json")
        assert not any(fs.exists(f"{root}/cfg/{k}/{name}{SUFFIX[k]}") for k in SUFFIX)
    code, res = _verify_json(capsys, uri)
    assert code == 1 and res["bad"] == [] and res["missing"] == [f"cfg/{n}" for n in sorted(bad)]

    # a copy that lost a file under a standing marker: a plain rerun's listing check catches it
    fs.rm_file(f"{root}/cfg/webdataset/{SHARDS[4]}.tar")
    assert main(["run", config, "--output", uri, "--quiet"]) == 0
    capsys.readouterr()
    run = json.loads(fs.cat_file(f"{root}/run.json"))
    assert run["shards"]["made"] == 3 and run["healed"] == [f"cfg/{SHARDS[4]}"]  # repaired ones were pending
    fs.invalidate_cache()
    _assert_healed(fs, root, markers)
    assert _verify_json(capsys, uri)[0] == 0


def test_verify_needs_a_run_record(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "no run.json" in capsys.readouterr().err
    with pytest.raises(OSError, match="no run.json"):
        verify(str(tmp_path / "nowhere"))
