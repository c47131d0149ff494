"""One local Ray cluster for the distributed tests: two CPU workers, no dashboard (kept small: 2 cores here)."""

import importlib.util
import os

import pytest

if importlib.util.find_spec("ray") is None:  # the optional extra is missing: only the tests without Ray run
    collect_ignore = ["test_pool.py", "test_jobs.py"]


@pytest.fixture(scope="package")
def ray_cluster():
    """A local two-CPU cluster for this package's tests (shut down after them, so its processes do not take CPU
    from the rest of the suite); workers inherit this tree on their import path."""
    ray = pytest.importorskip("ray", reason="Ray is the optional extra workbench[distributed]")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()
