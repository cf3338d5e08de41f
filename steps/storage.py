"""Where a run's files live.

A run's storage root is ``<storage>/<flow>/<run_id>/``. ``<storage>`` is a local folder now;
``s3://`` roots come with the S3 backend (one small API over both), so every step asks this
module for paths instead of joining strings itself::

    >>> run_root("/data/pt", "SFTFlow", "17")
    '/data/pt/SFTFlow/17'
"""

from __future__ import annotations

from pathlib import Path


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def require_local(uri: str, what: str) -> Path:
    """Return ``uri`` as a local path, or fail clearly for a backend not supported yet."""
    if is_s3(uri):
        raise NotImplementedError(f"{what} on s3:// is not supported yet: {uri}")
    return Path(uri)


def run_root(storage_root: str, flow_name: str, run_id: str) -> str:
    """The folder that holds every file of one run."""
    return str(require_local(storage_root, "storage") / flow_name / str(run_id))


def subdir(root: str, *parts: str) -> Path:
    """``root/parts...``, created if missing."""
    path = require_local(root, "storage").joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
