import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


REQUIRE_SYSTEM_DEPS = "FACTORY_REQUIRE_SYSTEM_DEPS"


def require_system_package(package: str, present: bool, why: str = "") -> None:
    """Skip the calling test, naming the Debian ``package`` it needs, when ``present`` is false.

    Under ``FACTORY_REQUIRE_SYSTEM_DEPS=1`` (``.ci/run`` sets it after installing the packages) the test
    fails instead, so CI runs everything and a missing package cannot pass silently as a skip.
    """
    if present:
        return
    reason = f"needs Debian's {package!r} (apt-get install {package}){': ' + why if why else ''}"
    if os.environ.get(REQUIRE_SYSTEM_DEPS, "") not in ("", "0"):
        pytest.fail(f"{reason}; {REQUIRE_SYSTEM_DEPS} is set, so a missing system package fails", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def system_package():
    """``system_package(package, present, why)``: :func:`require_system_package` for a test."""
    return require_system_package


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models and problems run fastest, and least noisily, on one thread of a small shared CPU."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def local_ray():
    """A real local Ray with 2 CPUs, shared by every test that needs one."""
    import ray

    from factory.dataplane import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    # Ray workers import the classes defined in test modules by name: let them find the tests folder.
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray_env():
    """S3 settings in the environment before Ray starts, so its workers inherit them."""
    port = _free_port()
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import ray

    if ray.is_initialized():  # workers of an earlier Ray lack the variables
        ray.shutdown()
    yield port
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def s3(local_ray_env):
    """A real S3-compatible endpoint (moto's server on 127.0.0.1) with the bucket ``factory-test``."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    port = local_ray_env
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client of an earlier module knows an earlier port
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.makedirs("factory-test", exist_ok=True)  # moto's state lives in this process, across servers
    yield server, port
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


TINY_RUN = {
    "name": "tiny",
    "seed": 5,
    "data": {"source": "digits", "classes": ["1", "4", "7"]},
    "sampling": {"steps": 2, "shard_size": 2},
    "executor": {"num_actors": [1, 1]},
    "recipes": {"cfg": {"cfg_scale": 2.0, "images_per_class": 3}},
}


@pytest.fixture(scope="session")
def tiny_run(local_ray, tmp_path_factory):
    """One real ``factory run`` of TINY_RUN (3 classes x 3 images in shards of 2: 6 shards, 9 images), made once
    for the tests that read or copy a finished output: (config path, output folder)."""
    import yaml

    from factory.cli import main

    tmp = tmp_path_factory.mktemp("tiny_run")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    out = str(tmp / "out")
    assert main(["run", str(config), "--output", out, "--quiet"]) == 0
    return str(config), out


# Tests that start processes (a local Ray, the S3 endpoint, a browser, a CLI run) are integration tests;
# the rest are unit tests: `pytest -m "not integration"` is the quick loop, plain `pytest` runs both.
INTEGRATION_FIXTURES = {"local_ray", "local_ray_env", "s3", "tiny_run"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        uses = INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if uses or item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)
