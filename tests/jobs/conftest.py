"""Fixtures for the generation job: one local Ray for the session (told it has 2 GPUs on a
CPU machine), a moto S3 server on 127.0.0.1, test inputs and a small model."""

from __future__ import annotations

import logging
import os

import pytest

from tests.jobs.helpers import write_inputs, write_model

DUMMY_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def ray_address(moto_endpoint):
    """A local Ray with 2 CPUs and 2 (pretend) GPUs. The workers get the dummy AWS
    credentials only through the job's runtime_env: this process has none when Ray
    starts, so S3 tests prove that the environment reaches the workers."""
    ray = pytest.importorskip("ray")
    saved = {
        k: os.environ.pop(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        if k in os.environ
    }
    try:
        ray.init(
            num_cpus=2,
            num_gpus=2,
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": dict(DUMMY_AWS)},
        )
    finally:
        os.environ.update(saved)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def model_files(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    """10 images, a corrupt and a missing one, in ``images.txt``."""
    return write_inputs(tmp_path_factory.mktemp("inputs"), n_good=10)


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    """The driver side of S3: endpoint and dummy credentials for this process."""
    import fsspec.config
    import s3fs

    for k, v in {**DUMMY_AWS, "FSSPEC_S3_ENDPOINT_URL": moto_endpoint}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": moto_endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint)
    bucket = f"jobs-{os.urandom(4).hex()}"
    fs.mkdir(bucket)
    yield bucket, fs
    s3fs.S3FileSystem.clear_instance_cache()
