"""One local Ray instance for the whole test session (ray.init costs ~5 s; Serve and Data share it).

Registered for every module through ``pytest_plugins`` in conftest.py. Ray advertises 4 CPUs on the 2-core machine: actor pools hold
their CPUs for the whole run and would otherwise starve the read/write tasks (ray.md, pitfalls).
"""

from __future__ import annotations

import os
import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short path: Ray's socket names have a length limit
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 * 2**20, _temp_dir=tmp,
             log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
