"""Shared test set-up: quiet, single-threaded, offline defaults, and a real S3 endpoint on loopback (moto).

The environment defaults are set at import, before any test module imports Ray, torch or botocore.
"""

from __future__ import annotations

import logging
import os
import uuid

import pytest

# One Ray instance for the whole session (the `ray_local` fixture), shared by every module.
pytest_plugins = ["ray_fixtures"]

_ENV_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # moto accepts any credentials; dummy ones keep botocore from searching ~/.aws or instance metadata.
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
}
for _name, _value in _ENV_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
# Loopback must never go through a proxy that the machine may define.
for _name in ("NO_PROXY", "no_proxy"):
    os.environ[_name] = ",".join(filter(None, [os.environ.get(_name), "127.0.0.1", "localhost"]))

import torch  # noqa: E402 - after OMP_NUM_THREADS

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto S3 server on 127.0.0.1 and a free port, for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # verbose=False does not silence request logs
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket ("corpus-<8 hex>": bucket names need 3+ lower-case characters) on `s3_endpoint`."""
    import boto3

    name = f"corpus-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name
