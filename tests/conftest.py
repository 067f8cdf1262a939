import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


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
