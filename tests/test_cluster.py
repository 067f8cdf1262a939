"""Deployment files under cluster/: they parse, use only real fields, put the head on demand and the
GPU workers on spot, autoscale, name only job configs that exist and validate, and hold no secret.

Fast: reads files only; Ray's own cluster-config schema is the one of the installed Ray.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from factory.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def _files(*suffixes: str) -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and (not suffixes or p.suffix in suffixes))


YAML_FILES = _files(".yaml", ".yml")
TEXT_FILES = _files()


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _walk(node, path=""):
    """Every (dotted path, value) in a parsed YAML tree, containers included."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


# ----------------------------------------------------------------------------------------------- all


def test_the_expected_files_exist():
    for p in [*LAUNCHERS, RAYCLUSTER, RAYJOB, CLUSTER / "README.md"]:
        assert p.is_file(), f"missing {_rel(p)}"


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_every_yaml_parses(path):
    docs = _docs(path)
    assert docs, f"{_rel(path)}: no YAML document"
    for d in docs:
        assert isinstance(d, dict), f"{_rel(path)}: a document is not a mapping"


def _kind(doc: dict) -> str:
    if "provider" in doc and "available_node_types" in doc:
        return "launcher"
    if str(doc.get("apiVersion", "")).startswith("ray.io/"):
        return "kuberay"
    return "other"


def test_every_yaml_is_a_launcher_config_or_a_kuberay_manifest():
    kinds = {(_rel(p), _kind(d)) for p in YAML_FILES for d in _docs(p)}
    assert not [k for k in kinds if k[1] == "other"], f"unrecognised YAML documents: {kinds}"


# ---------------------------------------------------------------------------------- cluster launcher

LAUNCHER_KEYS = ["cluster_name", "provider", "available_node_types", "head_node_type", "max_workers",
                 "idle_timeout_minutes", "head_start_ray_commands", "worker_start_ray_commands"]
GPU_INSTANCE = re.compile(r"^(g4dn|g4ad|g5|g5g|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en|p6)\.|^(a2|a3|a4|g2)-")


def _launcher(path: Path) -> dict:
    (doc,) = _docs(path)
    return doc


def _instance_type(node_config: dict) -> str:
    return str(node_config.get("InstanceType") or node_config.get("machineType") or "")


def _has_gpu(node_type: dict) -> bool:
    if node_type.get("resources", {}).get("GPU", 0) > 0:
        return True
    nc = node_type["node_config"]
    return bool(nc.get("guestAccelerators")) or bool(GPU_INSTANCE.search(_instance_type(nc)))


def _is_spot(node_config: dict) -> bool:
    market = node_config.get("InstanceMarketOptions", {})  # AWS
    if str(market.get("MarketType", "")).lower() == "spot":
        return True
    sched = node_config.get("scheduling", {})  # GCP; Ray's own examples also use a list of mappings
    items = sched if isinstance(sched, list) else [sched]
    return any(s.get("preemptible") is True or str(s.get("provisioningModel", "")).upper() == "SPOT"
               for s in items if isinstance(s, dict))


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_has_the_required_keys(path):
    cfg = _launcher(path)
    missing = [k for k in LAUNCHER_KEYS if k not in cfg]
    assert not missing, f"{_rel(path)}: missing {missing}"
    assert cfg["provider"].get("type") in ("aws", "gcp"), f"{_rel(path)}: provider.type"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["idle_timeout_minutes"] > 0
    assert cfg.get("setup_commands") or cfg.get("docker", {}).get("image"), \
        f"{_rel(path)}: nothing installs the package (setup_commands or docker.image)"
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_passes_rays_own_schema(path):
    """The installed Ray's ray-schema.json forbids unknown keys at the top level and in node types."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    pytest.importorskip("jsonschema")
    cfg = util.prepare_config(copy.deepcopy(_launcher(path)))  # merges the provider's defaults
    util.validate_config(cfg)


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_head_is_on_demand_without_gpu_and_workers_include_spot_gpus(path):
    cfg = _launcher(path)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not _is_spot(head["node_config"]), f"{_rel(path)}: the head must be on demand"
    assert not _has_gpu(head), f"{_rel(path)}: the head needs no GPU"
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert workers, f"{_rel(path)}: no worker node type"
    for name, t in workers.items():
        lo, hi = t.get("min_workers", 0), t.get("max_workers")
        assert hi is not None, f"{_rel(path)}: {name}.max_workers is not set"
        assert 0 <= lo <= hi <= cfg["max_workers"], f"{_rel(path)}: {name}: min/max_workers {lo}/{hi}"
    spot_gpu = [n for n, t in workers.items() if _has_gpu(t) and _is_spot(t["node_config"])]
    assert spot_gpu, f"{_rel(path)}: no spot / preemptible GPU worker type"


@pytest.mark.parametrize("path", LAUNCHERS, ids=_rel)
def test_launcher_installs_the_synced_working_tree(path):
    """setup_commands pip-installs (editable) the folder that file_mounts fills from the repository."""
    cfg = _launcher(path)
    synced = [remote for remote, local in (cfg.get("file_mounts") or {}).items() if local in (".", "./")]
    assert synced, f"{_rel(path)}: file_mounts does not sync the repository ('.')"
    installs = [c for c in cfg.get("setup_commands", []) if "pip install" in c]
    assert any(f"-e {remote}" in c for c in installs for remote in synced), \
        f"{_rel(path)}: no `pip install -e <synced folder>` in setup_commands"
    assert "gcp_credentials" not in cfg["provider"], f"{_rel(path)}: inline provider credentials"


# ---------------------------------------------------------------------------------------------- KubeRay

# Field names from the KubeRay API reference (ray.io/v1), https://ray-project.github.io/kuberay/reference/api/
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
               "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
                   "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions"}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                      "upscalingMode", "version", "env", "envFrom", "volumeMounts"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
SPOT_LABEL = re.compile(r"spot|preemptible", re.I)


def _manifest(path: Path, kind: str) -> dict:
    (doc,) = _docs(path)
    assert doc.get("apiVersion") == "ray.io/v1", f"{_rel(path)}: apiVersion {doc.get('apiVersion')!r}"
    assert doc.get("kind") == kind, f"{_rel(path)}: kind {doc.get('kind')!r}"
    assert doc.get("metadata", {}).get("name"), f"{_rel(path)}: metadata.name"
    return doc


def _unknown(d: dict, known: set[str]) -> list[str]:
    return sorted(set(d) - known)


def _gpus(container: dict) -> int:
    res = container.get("resources", {})
    return max(int(res.get(k, {}).get("nvidia.com/gpu", 0)) for k in ("requests", "limits"))


def _spot_selected(pod: dict) -> bool:
    """The pod spec requires or targets spot nodes (nodeSelector, required node affinity In)."""
    if any(SPOT_LABEL.search(f"{k}={v}") for k, v in (pod.get("nodeSelector") or {}).items()):
        return True
    terms = (pod.get("affinity", {}).get("nodeAffinity", {})
             .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", []))
    return bool(terms) and all(
        any(e.get("operator") == "In" and SPOT_LABEL.search(f"{e.get('key')}={e.get('values')}")
            for e in t.get("matchExpressions", []))
        for t in terms)


def _spot_excluded(pod: dict) -> bool:
    """The pod spec keeps off spot nodes: an on-demand nodeSelector, or NotIn on spot labels."""
    sel = pod.get("nodeSelector") or {}
    if any(re.search(r"on[-_]?demand", str(v), re.I) for v in sel.values()):
        return True
    terms = (pod.get("affinity", {}).get("nodeAffinity", {})
             .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", []))
    return bool(terms) and all(
        any(e.get("operator") in ("NotIn", "DoesNotExist") and SPOT_LABEL.search(f"{e.get('key')}={e.get('values')}")
            for e in t.get("matchExpressions", []))
        for t in terms)


def _check_cluster_spec(spec: dict, where: str):
    assert not _unknown(spec, RAYCLUSTER_SPEC), f"{where}: unknown fields {_unknown(spec, RAYCLUSTER_SPEC)}"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: enableInTreeAutoscaling must be true"
    assert not _unknown(spec.get("autoscalerOptions", {}), AUTOSCALER_OPTIONS), f"{where}.autoscalerOptions"
    assert spec.get("rayVersion"), f"{where}: rayVersion"

    head = spec["headGroupSpec"]
    assert not _unknown(head, HEAD_GROUP), f"{where}.headGroupSpec: unknown fields {_unknown(head, HEAD_GROUP)}"
    head_pod = head["template"]["spec"]
    assert not _spot_selected(head_pod), f"{where}: the head must not be scheduled on spot nodes"
    assert _spot_excluded(head_pod), f"{where}: the head must be kept off spot nodes (on-demand selector / NotIn)"
    assert not any(_gpus(c) for c in head_pod["containers"]), f"{where}: the head needs no GPU"

    groups = spec.get("workerGroupSpecs") or []
    assert groups, f"{where}: no workerGroupSpecs"
    spot_gpu = []
    for g in groups:
        name = f"{where}.workerGroupSpecs[{g.get('groupName')}]"
        assert not _unknown(g, WORKER_GROUP), f"{name}: unknown fields {_unknown(g, WORKER_GROUP)}"
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas")
        assert hi is not None and 0 <= lo <= hi, f"{name}: minReplicas/maxReplicas {lo}/{hi}"
        assert lo <= g.get("replicas", lo) <= hi, f"{name}: replicas outside [minReplicas, maxReplicas]"
        pod = g["template"]["spec"]
        if any(_gpus(c) >= 1 for c in pod["containers"]) and _spot_selected(pod):
            spot_gpu.append(g["groupName"])
            tolerated = {t.get("key") for t in pod.get("tolerations", [])}
            assert "nvidia.com/gpu" in tolerated, f"{name}: GPU nodes are usually tainted nvidia.com/gpu"
    assert spot_gpu, f"{where}: no worker group requests nvidia.com/gpu on spot nodes"


def test_raycluster_autoscales_with_on_demand_head_and_spot_gpu_workers():
    doc = _manifest(RAYCLUSTER, "RayCluster")
    _check_cluster_spec(doc["spec"], _rel(RAYCLUSTER))


def test_rayjob_spec():
    doc = _manifest(RAYJOB, "RayJob")
    spec, where = doc["spec"], _rel(RAYJOB)
    assert not _unknown(spec, RAYJOB_SPEC), f"{where}: unknown fields {_unknown(spec, RAYJOB_SPEC)}"
    for key in ("entrypoint", "shutdownAfterJobFinishes", "backoffLimit", "rayClusterSpec", "runtimeEnvYAML"):
        assert key in spec, f"{where}: spec.{key} is missing"
    assert spec["entrypoint"].startswith("factory run "), f"{where}: entrypoint should be `factory run ...`"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict), f"{where}: runtimeEnvYAML is not a YAML mapping"
    if "working_dir" in runtime_env and not re.match(r"^\w+://", str(runtime_env["working_dir"])):
        # a local working_dir is uploaded by the submitter pod, which only K8sJobMode has
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", \
            f"{where}: a local runtimeEnvYAML.working_dir needs submissionMode K8sJobMode"
    _check_cluster_spec(spec["rayClusterSpec"], f"{where}.spec.rayClusterSpec")


def _ray_containers(cluster_spec: dict) -> list[dict]:
    pods = [cluster_spec["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]
    return [c for p in pods for c in p["containers"]]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=_rel)
def test_kuberay_credentials_come_from_secrets(path):
    """Head and workers both write the output, so both read the S3 keys, from a Secret."""
    (doc,) = _docs(path)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    for c in _ray_containers(spec):
        env = {e["name"]: e for e in c.get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert name in env, f"{_rel(path)}: container {c['name']} lacks {name}"
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"], \
                f"{_rel(path)}: {c['name']}.{name} must come from valueFrom.secretKeyRef"


# ------------------------------------------------------------------------------------ version pinning


def test_one_ray_version_everywhere():
    versions = {}
    for p in TEXT_FILES:
        for m in re.finditer(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)", p.read_text()):
            versions.setdefault(m.group(1), set()).add(_rel(p))
    for p in (RAYCLUSTER, RAYJOB):
        (doc,) = _docs(p)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        versions.setdefault(str(spec["rayVersion"]), set()).add(_rel(p))
    assert len(versions) == 1, f"Ray versions differ across cluster/: {versions}"


def test_dockerfile_copies_what_exists_into_the_working_dir_the_rayjob_uploads():
    text = (CLUSTER / "Dockerfile").read_text()
    for line in re.findall(r"(?m)^COPY\s+(.+)$", text):
        sources = [a for a in line.split() if not a.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"cluster/Dockerfile: COPY source {src} does not exist"
    workdir = re.findall(r"(?m)^WORKDIR\s+(\S+)", text)[-1]
    (doc,) = _docs(RAYJOB)
    working_dir = yaml.safe_load(doc["spec"]["runtimeEnvYAML"]).get("working_dir")
    if working_dir and not re.match(r"^\w+://", working_dir):
        assert working_dir == workdir, f"rayjob working_dir {working_dir} is not the image's WORKDIR {workdir}"


# ------------------------------------------------------------------------------- referenced job configs

JOB_REF = re.compile(r"(?<![\w<])jobs/([\w.-]+\.ya?ml)\b")


def _job_refs() -> dict[str, set[str]]:
    refs: dict[str, set[str]] = {}
    for p in TEXT_FILES:
        for m in JOB_REF.finditer(p.read_text()):
            refs.setdefault(f"jobs/{m.group(1)}", set()).add(_rel(p))
    return refs


def test_the_rayjob_runs_a_job_config():
    (doc,) = _docs(RAYJOB)
    assert JOB_REF.search(doc["spec"]["entrypoint"]), "the RayJob entrypoint names no jobs/<x>.yaml"


@pytest.mark.parametrize("job", sorted(_job_refs()) or ["<none>"])
def test_every_referenced_job_config_exists_and_validates(job):
    if job == "<none>":
        pytest.skip("no job config referenced under cluster/")
    path = ROOT / job
    assert path.is_file(), f"{job}, named in {sorted(_job_refs()[job])}, does not exist"
    load_config(path)


def _factory_run_commands() -> list[tuple[str, list[str]]]:
    """Every `factory run ...` command line in cluster/: YAML entrypoints, README code, comments."""
    found = []
    for p in TEXT_FILES:
        text = re.sub(r"\\\n\s*(#\s*)?", " ", p.read_text())  # join continued lines (also in # comments)
        for line in text.splitlines():
            line = re.sub(r"^\s*(#|-)?\s*(entrypoint:)?", "", line)
            at = line.find("factory run ")
            if at < 0 or "`factory run ...`" in line:
                continue
            cmd = line[at:].split("#")[0].split("`")[0].strip()
            try:
                found.append((f"{_rel(p)}: {cmd}", shlex.split(cmd)))
            except ValueError as e:
                raise AssertionError(f"{_rel(p)}: cannot parse {cmd!r}: {e}") from None
    return found


def test_every_factory_run_command_validates_with_its_overrides():
    commands = _factory_run_commands()
    assert commands, "no `factory run` command under cluster/"
    for where, argv in commands:
        assert argv[:2] == ["factory", "run"], where
        args, sets, i = argv[2:], [], 0
        positional = []
        while i < len(args):
            if args[i] == "--set":
                sets.append(args[i + 1])
                i += 2
            elif args[i] == "--output":
                assert i + 1 < len(args), f"{where}: --output without a value"
                i += 2
            elif args[i] == "--quiet":
                i += 1
            elif args[i].startswith("-"):
                raise AssertionError(f"{where}: unknown option {args[i]}")
            else:
                positional.append(args[i])
                i += 1
        assert len(positional) == 1, f"{where}: expected one CONFIG, got {positional}"
        m = JOB_REF.search(positional[0])
        assert m, f"{where}: CONFIG is not a jobs/<x>.yaml"
        load_config(ROOT / "jobs" / m.group(1), sets)


# ---------------------------------------------------------------------------------------------- secrets

_SHELL_REF = r"""(?!["']?(\$|<|\.\.\.|\{\{))"""  # $VAR, "$VAR", <placeholder>, ..., {{ template }}
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*" + _SHELL_REF + r"\S+"),
    "AWS session token": re.compile(r"(?i)aws_session_token\s*[:=]\s*" + _SHELL_REF + r"\S+"),
    "40-char AWS secret": re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GCP service-account key": re.compile(r"\"private_key(_id)?\"\s*:|\"type\"\s*:\s*\"service_account\""),
    "password/token literal": re.compile(
        r"(?i)\b(password|passwd|secret|token|api[_-]?key)\b\s*[:=]\s*" + _SHELL_REF + r"[\"']?[A-Za-z0-9/+_\-]{12,}"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "Slack token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
}
CREDENTIAL_NAME = re.compile(r"(?i)(secret|password|passwd|token|credential|access_key|api_?key|private_key)")


def _secrets_in(text: str) -> list[str]:
    hits = []
    for name, rx in SECRET_PATTERNS.items():
        for m in rx.finditer(text):
            if name == "40-char AWS secret" and not (re.search(r"[A-Z]", m.group()) and re.search(r"[a-z]", m.group())
                                                     and re.search(r"\d", m.group())):
                continue  # a path or a word run, not key material
            hits.append(f"{name} at line {text.count(chr(10), 0, m.start()) + 1}")  # never echo the value
    return hits


def test_the_secret_scanner_catches_secrets_and_passes_references():
    fake_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    fake_key = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY1"[:18]
    bad = [fake_id, f"aws_secret_access_key = {fake_key}", f"AWS_SECRET_ACCESS_KEY: {fake_key}",
           f"export AWS_SECRET_ACCESS_KEY={fake_key}", "-----BEGIN RSA PRIVATE KEY-----",
           '{"type": "service_account", "private_key": "x"}', "password: hunter2hunter2hunter2",
           "token: " + "hf_" + "a" * 34]
    for text in bad:
        assert _secrets_in(text), f"the scanner misses {text!r}"
    good = ["- name: AWS_SECRET_ACCESS_KEY\n  valueFrom:\n    secretKeyRef: {name: s, key: AWS_SECRET_ACCESS_KEY}",
            '--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"',
            "aws_secret_access_key = <your key>", "ImageId: resolve:ssm:/aws/service/deeplearning/ami/x86_64/latest",
            "sourceImage: projects/deeplearning-platform-release/global/images/family/common-cu128"]
    for text in good:
        assert not _secrets_in(text), f"the scanner flags {text!r}: {_secrets_in(text)}"


@pytest.mark.parametrize("path", TEXT_FILES, ids=_rel)
def test_no_literal_secrets(path):
    hits = _secrets_in(path.read_text(errors="replace"))
    assert not hits, f"{_rel(path)}: looks like a literal secret: {hits}"


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_credential_like_settings_are_references(path):
    """A credential-named env var takes valueFrom, never value; runtime-env env_vars hold none."""
    for doc in _docs(path):
        for where, node in _walk(doc):
            if isinstance(node, dict) and "name" in node and ("value" in node or "valueFrom" in node):
                if CREDENTIAL_NAME.search(str(node["name"])):
                    assert "value" not in node, f"{_rel(path)}: {where} ({node['name']}) has a literal value"
            if where.endswith("runtimeEnvYAML") and isinstance(node, str):
                env_vars = (yaml.safe_load(node) or {}).get("env_vars", {})
                bad = [k for k in env_vars if CREDENTIAL_NAME.search(k)]
                assert not bad, f"{_rel(path)}: runtimeEnvYAML env_vars carry credentials {bad}"
