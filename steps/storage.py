"""One small API over local paths and ``s3://`` URIs.

Steps ask this module for paths and bytes instead of joining strings or calling boto3
themselves, so the same code runs against a local folder and S3::

    >>> join("/data/pt", "SFTFlow", "17")
    '/data/pt/SFTFlow/17'
    >>> join("s3://bucket/pt/", "SFTFlow", "17")
    's3://bucket/pt/SFTFlow/17'

S3 goes through boto3. The endpoint comes from ``$METAFLOW_S3_ENDPOINT_URL`` (also what
Metaflow's own S3 client uses), else ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``, else AWS.
Credentials come from boto3's usual chain and are never logged.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def join(root: str | Path, *parts: str) -> str:
    """``root/parts...`` for a local folder or an ``s3://`` prefix."""
    if is_s3(root):
        return "/".join([str(root).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root).joinpath(*parts))


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def s3_endpoint_url() -> str | None:
    for var in ("METAFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


S3_TIMEOUTS = {"POSTTRAIN_S3_CONNECT_TIMEOUT_S": 10.0, "POSTTRAIN_S3_READ_TIMEOUT_S": 60.0,
               "POSTTRAIN_S3_MAX_ATTEMPTS": 3}
"""Bounds on every S3 call, each overridable by its environment variable: botocore's defaults
(60 s per connection attempt, retried) would keep a step waiting minutes on a dead endpoint. A
failed call's error names the endpoint (botocore: ``Could not connect to the endpoint URL: ...``)."""


def _s3_limits() -> tuple[float, float, int]:
    values = []
    for name, default in S3_TIMEOUTS.items():
        raw = os.environ.get(name)
        try:
            value = type(default)(raw) if raw else default
        except ValueError:
            raise ValueError(f"${name} must be a number, got {raw!r}") from None
        if value <= 0:
            raise ValueError(f"${name} must be > 0, got {raw!r}")
        values.append(value)
    return values[0], values[1], int(values[2])


@functools.lru_cache(maxsize=8)
def _client(endpoint_url: str | None, limits: tuple[float, float, int]):
    import boto3
    from botocore.config import Config

    connect_s, read_s, attempts = limits
    return boto3.client("s3", endpoint_url=endpoint_url, config=Config(
        connect_timeout=connect_s, read_timeout=read_s, retries={"total_max_attempts": attempts, "mode": "standard"}))


def s3_client():
    """A boto3 S3 client for the configured endpoint, with bounded timeouts and retries
    (:data:`S3_TIMEOUTS`); cached per endpoint and limits."""
    return _client(s3_endpoint_url(), _s3_limits())


def require_local(uri: str | Path, what: str) -> Path:
    """Return ``uri`` as a local path, or fail clearly where S3 is not supported yet."""
    if is_s3(uri):
        raise NotImplementedError(f"{what} on s3:// is not supported yet: {uri}")
    return Path(uri)


def run_root(storage_root: str, flow_name: str, run_id: str) -> str:
    """The folder that holds every file of one run: ``<storage>/<flow>/<run_id>``."""
    return str(require_local(storage_root, "run storage") / flow_name / str(run_id))


def subdir(root: str, *parts: str) -> Path:
    """``root/parts...`` as a local folder, created if missing."""
    path = require_local(root, "run storage").joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_read(uri: str | Path) -> BinaryIO:
    """A binary stream of the object (streamed from S3, not read into memory first)."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    return open(uri, "rb")


def read_bytes(uri: str | Path) -> bytes:
    with open_read(uri) as f:
        return f.read()


def write_bytes(uri: str | Path, data: bytes) -> None:
    """Write a whole object. Locally via a temporary file + rename, so readers never see half."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def put_if_absent(uri: str | Path, data: bytes) -> bool:
    """Create the object only if it does not exist; return whether this call created it.

    Locally an exclusive create (``O_EXCL``); on S3 a conditional put (``If-None-Match: *``),
    so two writers racing for the same name never both win.
    """
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(str(uri))
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def exists(uri: str | Path) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(str(uri))
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True
    return Path(uri).exists()


def list_files(prefix: str | Path) -> list[str]:
    """Every file under a folder / S3 prefix (recursive), sorted."""
    if is_s3(prefix):
        # ``s3://b/x`` is the object ``x`` itself (a single file) or everything under ``x/``.
        bucket, key = split_s3(str(prefix))
        key = key.rstrip("/")
        out = []
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            out += [f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", [])
                    if not key or obj["Key"] == key or obj["Key"].startswith(key + "/")]
        return sorted(out)
    root = Path(prefix)
    if root.is_file():
        return [str(root)]
    return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def delete(uri: str | Path) -> None:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def upload_file(local: str | Path, uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().upload_file(str(local), bucket, key)
    else:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local, uri)


def download_file(uri: str, local: str | Path) -> Path:
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().download_file(bucket, key, str(local))
    else:
        shutil.copy2(uri, local)
    return local

