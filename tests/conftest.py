"""Shared fixtures: one real Ray instance and one real S3 server (SeaweedFS) per test session."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = Path(__file__).resolve().parent.parent
TEST_BUCKET = "adpipe-test"


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A SeaweedFS S3 server on loopback with its own credentials, exported like a user would."""
    from pipelines import objectstore, storage

    store = objectstore.start(tmp_path_factory.mktemp("seaweedfs"), buckets=[TEST_BUCKET])
    saved = {k: os.environ.get(k) for k in store.env()}
    os.environ.update(store.env())
    storage._FILESYSTEMS.clear()  # filesystems built before now resolved other credentials
    yield store
    objectstore.stop_server(store)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    storage._FILESYSTEMS.clear()


@pytest.fixture(scope="session")
def ray_session(s3_store):
    """The embedded Ray of `adpipe run` (`ray_runtime`: loopback only), for the whole session.

    It depends on `s3_store` so that the S3 endpoint and credentials are in os.environ before Ray
    starts: workers inherit the environment Ray started with, and a Location unpickled in a worker
    builds its filesystem from that environment (no credentials travel with task arguments)."""
    import ray

    from pipelines.orchestrator import ray_runtime
    from pipelines.spec_fields import RaySpec

    with ray_runtime(RaySpec(address="local", num_cpus=2), log_to_driver=False):
        yield ray


@pytest.fixture
def s3_root(s3_store, request) -> str:
    """A fresh prefix in the test bucket for one test."""
    name = request.node.name[:40].replace("[", "-").replace("]", "")
    return f"s3://{TEST_BUCKET}/{name}-{uuid.uuid4().hex[:8]}".lower()


@pytest.fixture
def file_root(tmp_path) -> str:
    return f"file://{tmp_path}/store"


@pytest.fixture(params=["file", "s3"])
def any_root(request) -> str:
    """The same test on local files and on the real S3 server."""
    if request.param == "file":
        return request.getfixturevalue("file_root")
    return request.getfixturevalue("s3_root")
