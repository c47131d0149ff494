"""One local Ray cluster for the distributed tests: two CPU workers, no dashboard (kept small: 2 cores here)."""

import os

import pytest

ray = pytest.importorskip("ray", reason="Ray is the optional extra workbench[distributed]")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local two-CPU cluster for the session; workers inherit this tree on their import path."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()
