"""Shared test set-up: offline Hugging Face, a Metaflow user, the builtin model built once."""

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("METAFLOW_USER", "posttrain-tests")

# metaflow.Runner imports metaflow's vendored (old) typing_extensions, which replaces
# typing._collect_parameters for the whole process with a version that rejects TypeVar defaults;
# torch modules imported after that fail ("Type parameter ~_T1 without a default follows type
# parameter with a default"). Import it once here and put the standard function back.
import typing  # noqa: E402

_collect_parameters = getattr(typing, "_collect_parameters", None)
import metaflow._vendor.typing_extensions  # noqa: E402,F401

if _collect_parameters is not None:
    typing._collect_parameters = _collect_parameters

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def builtin_model_dir(tmp_path_factory) -> Path:
    """The builtin tiny Llama (model + tokenizer), built once per test session."""
    from steps.builtin import ensure_builtin_model

    return ensure_builtin_model("tiny-llama", tmp_path_factory.mktemp("builtin-cache"))


@pytest.fixture()
def metaflow_env(tmp_path, monkeypatch) -> Path:
    """A private Metaflow datastore for one test (the Client reads the same one)."""
    sysroot = tmp_path / "metaflow"
    sysroot.mkdir()
    monkeypatch.setenv("METAFLOW_DATASTORE_SYSROOT_LOCAL", str(sysroot))
    monkeypatch.setenv("METAFLOW_USER", "posttrain-tests")
    return sysroot


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real local S3 endpoint: moto in server mode on a free loopback port, for the session.

    Sets the environment (endpoint, fake credentials, region) for boto3 and Metaflow, and
    yields the endpoint URL. If ``$POSTTRAIN_TEST_S3_ENDPOINT`` names a running server
    (``.ci/run`` may start one), that server is used instead.
    """
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    endpoint = os.environ.get("POSTTRAIN_TEST_S3_ENDPOINT")
    proc = None
    if not endpoint:
        port = _free_port()
        server = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
        proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on port {port}; see {log.name}")
                time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in [*env, "METAFLOW_S3_ENDPOINT_URL"]}
    os.environ.update(env, METAFLOW_S3_ENDPOINT_URL=endpoint)
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture()
def s3_bucket(s3_endpoint) -> str:
    """A new, empty bucket on the local S3 endpoint; returns its name."""
    from steps.storage import s3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name
