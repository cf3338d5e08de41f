"""Versioned model registry on a local folder or an ``s3://bucket/prefix``.

Layout under the registry root (the same keys on both backends)::

    <root>/<name>/claims/<N>                       one small object per claimed version number
    <root>/<name>/versions/<N>/...                 the model files (Hugging Face format)
    <root>/<name>/versions/<N>/manifest.json       written LAST: the version exists once it does
    <root>/<name>/versions/<N>/promotion.json      the gate's decision about N (not checksummed)
    <root>/<name>/aliases/<alias>/history/<seq>.json   one object per move of an alias; the
                                                   highest ``seq`` is where the alias points now
    <root>/<name>/.staging/<uuid>/                 (local only) a registration in progress

Versions are immutable and numbered 1, 2, 3, ... (only folder names ``[1-9][0-9]*`` count;
anything else under ``versions/`` is ignored). A registration hashes the files, claims the
next number with a create-if-absent of ``claims/<N>`` (an exclusive create locally, a
conditional put with ``If-None-Match: "*"`` on S3; whoever loses the race tries N + 1), puts
the files under ``versions/<N>/`` and writes ``manifest.json`` last. Locally the files are
copied into a staging folder that is renamed into place; S3 has no rename, so the files are
uploaded straight under ``versions/<N>/``. Either way readers count a version only when its
``manifest.json`` exists, so a version is visible only once it is complete. A registration
killed midway leaves a claim without a manifest (the number is skipped, never reused) and
perhaps some files; nothing reads them, and ``Registry.gc`` removes the files once they are
older than a grace period.

An alias (``champion``, ``candidate``, any name) is its history: moving it claims
``history/<seq + 1>`` with the same create-if-absent, where ``seq`` is the highest entry the
mover read. Two concurrent moves cannot both claim the same ``seq``; the loser reads again and
decides again. This compare-and-swap also makes the promotion gate's read-decide-move race
free, on both backends, without locks.

Nothing read back is trusted. A ``manifest.json`` is checked before use: a JSON object whose
non-empty ``files`` maps safe relative paths (no ``..``, no absolute path, no backslash, no
empty or ``.`` component, no control character) to a 64-hex ``sha256`` and a byte count. A
version whose manifest fails is *broken*: ``get`` of it raises ``InvalidManifestError`` or
``UnsafePathError``; ``list`` and ``"latest"`` skip it with a ``RegistryWarning``. A pull
writes into a staging folder beside its destination and renames it into place only once every
file verified; it writes and deletes nothing else. A registration copies regular files only
and refuses a symlink that leads out of the model folder.

Example::

    reg = Registry("/tmp/registry")            # or Registry("s3://bucket/registry")
    reg.register("tiny-sft", "ckpt/step-40", {"metrics": {"eval_loss": 2.1}})  # -> version 1
    reg.get("tiny-sft").version                                               # -> 1 ("latest")
    reg.promote_if_better("tiny-sft", 1, metric="eval_loss", min_delta=0.0, mode="min")
    # -> {"promoted": True, "reason": "no current champion", ...}; reg.get("tiny-sft", "champion") is v1

Command line (exits 1 with ``error: ...`` for a missing root, model, version or alias)::

    python -m steps.registry --root ROOT list [NAME]
    python -m steps.registry --root ROOT show NAME VERSION_OR_ALIAS
    python -m steps.registry --root ROOT pull NAME VERSION_OR_ALIAS DEST
    python -m steps.registry --root ROOT promote NAME VERSION [--alias champion] [--metric M ...]
    python -m steps.registry --root ROOT gc [--grace-hours 24] [--dry-run]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable

from steps import storage
from steps.contracts import METRICS, reported

# Always used with ``fullmatch``: ``match`` with ``$`` also accepts a trailing newline.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# A version folder, claim or alias history entry: ASCII only (``str.isdigit`` also accepts
# '²' and Arabic-Indic digits), no leading zero, so each number has exactly one spelling.
_VERSION_PATTERN = re.compile(r"[1-9][0-9]*")
# A version number typed by a user ("01" is 1); the bound keeps ``int()`` and paths small.
_VERSION_STRING_PATTERN = re.compile(r"[0-9]{1,30}")
_DIGITS_PATTERN = re.compile(r"[0-9]+")
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
# What ``_LocalBackend.put_if_absent`` and ``_LocalBackend.remove_tree`` leave if killed.
_TEMP_FILE_PATTERN = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")
_TRASH_PATTERN = re.compile(r"\.gc-[0-9a-f]{32}")
_MAX_COMPONENT_BYTES = 255
_COPY_CHUNK_BYTES = 8 * 1024 * 1024
# Files the registry writes itself inside a version folder; a source folder that already
# has them (for example a pulled version being registered again) does not copy them.
_REGISTRY_FILE_NAMES = frozenset({"manifest.json", "promotion.json"})


class RegistryError(Exception):
    """Base class of the registry's own errors."""


class NotFoundError(RegistryError, LookupError):
    """A model, version or alias that the registry does not hold."""


class ChecksumMismatch(RegistryError):
    """A file whose bytes do not match the sha256 recorded in the manifest.

    ``relpath`` names the file inside the version folder.
    """

    def __init__(self, relpath: str, expected_sha256: str, actual_sha256: str):
        super().__init__(
            f"checksum mismatch for {relpath!r}: manifest says sha256 {expected_sha256}, "
            f"file has {actual_sha256}"
        )
        self.relpath = relpath
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256


class InvalidManifestError(RegistryError, ValueError):
    """A ``manifest.json`` the registry cannot use: not JSON, not an object, no ``files``, an
    empty ``files``, or an entry without a 64-hex ``sha256`` and a non-negative int ``bytes``.

    ``uri`` names the manifest file and ``problem`` what is wrong with it, e.g.
    ``/reg/tiny/versions/3/manifest.json: 'files' is empty; a version holds at least one file``.
    """

    def __init__(self, uri: str, problem: str):
        super().__init__(f"{uri}: {problem}")
        self.uri = uri
        self.problem = problem


class UnsafePathError(RegistryError, ValueError):
    """A file path that could reach outside the folder it belongs to.

    Either an entry of a manifest's ``files`` (``../x``, ``/etc/passwd``, ``a\\b``, ``a//b``),
    refused before anything is read or written, or an entry of a model folder being
    registered (a symlink that leads outside it, a name no manifest may hold). ``where``
    names the manifest or the folder, ``path`` the entry, ``problem`` the rule it breaks.
    """

    def __init__(self, where: str, path: str, reason: str):
        self.problem = f"unsafe path {_short(path)}: {reason}"
        super().__init__(f"{where}: {self.problem}")
        self.where = where
        self.path = path


class DestinationExistsError(RegistryError):
    """A pull's destination that holds something other than an earlier pull of that version.

    ``dest`` names it; the pull leaves it untouched (it never merges into or deletes a folder).
    """

    def __init__(self, dest: str | Path, reason: str):
        super().__init__(f"destination {str(dest)!r} {reason}")
        self.dest = str(dest)


class RegistryWarning(UserWarning):
    """A broken version that ``list`` or ``"latest"`` skipped; the message names its manifest."""


# A version whose manifest fails the checks: ``get`` raises these, ``list`` skips it.
_BROKEN_VERSION_ERRORS = (InvalidManifestError, UnsafePathError)


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """One complete, immutable registered version.

    ``uri`` is where the files live (a local folder, or ``s3://bucket/.../versions/N``);
    ``manifest`` is the parsed ``manifest.json`` (lineage, metrics, ``files`` with checksums).
    """

    name: str
    version: int
    uri: str
    manifest: dict[str, Any] = dataclasses.field(compare=False, repr=False)

    @property
    def path(self) -> Path:
        """The version folder as a ``Path`` (local registries only; use ``download`` for S3)."""
        if storage.is_s3(self.uri):
            raise ValueError(f"{self.uri} is on S3, not a local folder; use Registry.download")
        return Path(self.uri)


def validate_name(value: str, *, what: str = "name") -> str:
    """Return ``value`` if it is a safe model or alias name, else raise ``ValueError``.

    A name starts with a letter or digit, then up to 127 of ``[A-Za-z0-9._-]`` and nothing
    else (not even a trailing newline), and never contains ``..`` (so it can never climb out
    of the registry root).

    Example:
        >>> validate_name("tiny-sft_v2.1")
        'tiny-sft_v2.1'
        >>> validate_name("../x")
        Traceback (most recent call last):
        ...
        ValueError: invalid name '../x': must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ and not contain '..'
        >>> validate_name("champion\\n", what="alias")
        Traceback (most recent call last):
        ...
        ValueError: invalid alias 'champion\\n': must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ and not contain '..'
    """
    if not isinstance(value, str) or not _NAME_PATTERN.fullmatch(value) or ".." in value:
        raise ValueError(
            f"invalid {what} {_short(value)}: must match {_NAME_PATTERN.pattern} and not contain '..'"
        )
    return value


def validate_alias(alias: str) -> str:
    """Like ``validate_name``; an alias also may not be all digits or ``latest``.

    Those spellings already mean "version N" and "the highest version" in ``Registry.get``.

    Example:
        >>> validate_alias("champion")
        'champion'
        >>> validate_alias("3")
        Traceback (most recent call last):
        ...
        ValueError: invalid alias '3': an alias may not be all digits (that means a version number)
    """
    validate_name(alias, what="alias")
    if _DIGITS_PATTERN.fullmatch(alias):
        raise ValueError(
            f"invalid alias {alias!r}: an alias may not be all digits (that means a version number)"
        )
    if alias == "latest":
        raise ValueError(f"invalid alias {alias!r}: 'latest' always means the highest version")
    return alias


def _utc_now_iso(timespec: str = "seconds") -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec=timespec)


def _default_user() -> str:
    return os.environ.get("METAFLOW_USER") or os.environ.get("USER") or "unknown"


# ---------------------------------------------------------------------- storage backends
#
# The registry's logic (claims, manifests, aliases, the gate, checksums) is written once in
# ``Registry``. Reads, plain writes and existence checks go through ``steps.storage``, which
# already speaks both local paths and s3://. The two classes below hold only what differs:
# an atomic create-if-absent, listing one level of a folder, how a version's files are put
# in place before the manifest, and what ``Registry.gc`` needs (ages, removal).


class _LocalBackend:
    """Primitive I/O on a local (or shared POSIX) folder."""

    def put_if_absent(self, uri: str, data: bytes) -> bool:
        """Create ``uri`` holding ``data`` unless it exists; whether this call created it.

        The bytes go to a unique temp file first, which is then hard-linked to the final
        name: ``link`` fails if the name exists (as ``O_EXCL`` does), and a reader never sees
        the file empty or half written, which an ``O_EXCL`` create followed by a write allows.
        """
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(temp_path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp_path, path)
        except FileExistsError:
            return False
        finally:
            temp_path.unlink()
        return True

    def list_children(self, uri: str) -> list[str]:
        """Names directly inside the folder ``uri`` (empty if it does not exist or is a file)."""
        try:
            return os.listdir(uri)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def stage(self, staging_uri: str, sources: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """Copy the files into a staging folder, hashing the bytes as they are copied."""
        files = {}
        for relpath, source in sources.items():
            with open(source, "rb") as reader:
                sha256, num_bytes = _copy_stream_hashed(reader, Path(staging_uri) / relpath)
            files[relpath] = {"sha256": sha256, "bytes": num_bytes}
        return files

    def publish(self, staging_uri: str, version_uri: str, sources: dict[str, Path],
                manifest_bytes: bytes) -> None:
        """Write the manifest into the staging folder, then rename it to ``version_uri``."""
        storage.write_bytes(storage.join(staging_uri, "manifest.json"), manifest_bytes)
        target = Path(version_uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging_uri, target)
        # Make the rename itself durable, not just the files it moved.
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self, staging_uri: str) -> None:
        shutil.rmtree(staging_uri, ignore_errors=True)

    def root_exists(self, root: str) -> bool:
        return os.path.isdir(root)

    def newest_mtime(self, uri: str) -> float | None:
        """The newest modification time (seconds) of ``uri`` or anything under it; None if absent.

        Links are not followed: only what the registry itself wrote counts.
        """
        try:
            newest = os.lstat(uri).st_mtime
        except FileNotFoundError:
            return None
        for folder, dirnames, filenames in os.walk(uri):
            for entry in dirnames + filenames:
                try:
                    newest = max(newest, os.lstat(os.path.join(folder, entry)).st_mtime)
                except FileNotFoundError:
                    pass  # removed while we looked
        return newest

    def remove_tree(self, uri: str) -> None:
        """Remove a file, or a folder and everything in it (links removed, never followed).

        A folder is first renamed to ``.gc-<uuid>`` beside it, so a registration that would
        still rename it into ``versions/`` fails instead of publishing half of it; the next
        ``Registry.gc`` finishes a removal that was killed.
        """
        path = Path(uri)
        if path.is_dir() and not path.is_symlink():
            trash = path.with_name(f".gc-{uuid.uuid4().hex}")
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                return  # a concurrent gc took it
            shutil.rmtree(trash, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def stale_uploads(self, uri: str, cutoff: float) -> list[tuple[str, str]]:
        return []  # a local copy has no invisible half-written parts

    def abort_upload(self, uri: str, upload_id: str) -> None:
        raise NotImplementedError("a local registry has no multipart uploads")


class _S3Backend:
    """Primitive I/O on ``s3://bucket/prefix`` through boto3 (endpoint from ``steps.storage``)."""

    def put_if_absent(self, uri: str, data: bytes) -> bool:
        """A conditional put with ``If-None-Match: "*"``: S3 itself refuses a second creator."""
        return storage.put_if_absent(uri, data)

    def list_children(self, uri: str) -> list[str]:
        """Names directly under the prefix ``uri/``: sub-prefixes and objects, one level."""
        bucket, key = storage.split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        names = []
        paginator = storage.s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names += [entry["Prefix"][len(prefix):].rstrip("/") for entry in page.get("CommonPrefixes", [])]
            names += [entry["Key"][len(prefix):] for entry in page.get("Contents", [])]
        return names

    def stage(self, staging_uri: str, sources: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """Hash the local files; nothing is written (S3 has no rename, so no staging prefix)."""
        files = {}
        for relpath, source in sources.items():
            with open(source, "rb") as reader:
                sha256, num_bytes = _hash_stream(reader)
            files[relpath] = {"sha256": sha256, "bytes": num_bytes}
        return files

    def publish(self, staging_uri: str, version_uri: str, sources: dict[str, Path],
                manifest_bytes: bytes) -> None:
        """Upload every file under ``version_uri``, then put ``manifest.json`` last.

        A file changed on disk between ``stage`` and this upload no longer matches its
        checksum; ``download`` and ``verify`` catch that.
        """
        for relpath, source in sources.items():
            storage.upload_file(source, storage.join(version_uri, relpath))
        storage.write_bytes(storage.join(version_uri, "manifest.json"), manifest_bytes)

    def discard(self, staging_uri: str) -> None:
        """Nothing to clean: uploaded files without a manifest are invisible (``Registry.gc``)."""

    def root_exists(self, root: str) -> bool:
        """Whether the bucket exists (an existing bucket with nothing under the prefix is an empty root)."""
        bucket, _ = storage.split_s3(root)
        try:
            storage.s3_client().head_bucket(Bucket=bucket)
        except Exception as error:
            if _is_missing_object(error) or _error_code(error) == "NoSuchBucket":
                return False
            raise
        return True

    def _objects(self, uri: str) -> list[dict[str, Any]]:
        bucket, key = storage.split_s3(uri)
        prefix = key.rstrip("/") + "/"
        paginator = storage.s3_client().get_paginator("list_objects_v2")
        return [entry for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
                for entry in page.get("Contents", [])]

    def newest_mtime(self, uri: str) -> float | None:
        """The newest ``LastModified`` (seconds) of the objects under ``uri/``; None if there are none."""
        return max((entry["LastModified"].timestamp() for entry in self._objects(uri)), default=None)

    def remove_tree(self, uri: str) -> None:
        bucket, _ = storage.split_s3(uri)
        for entry in self._objects(uri):
            storage.s3_client().delete_object(Bucket=bucket, Key=entry["Key"])

    def stale_uploads(self, uri: str, cutoff: float) -> list[tuple[str, str]]:
        """``(uri, upload id)`` of the multipart uploads under ``uri/`` started before ``cutoff``.

        A process killed while uploading a large file leaves its parts invisible and billed.
        """
        bucket, key = storage.split_s3(uri)
        paginator = storage.s3_client().get_paginator("list_multipart_uploads")
        return [(f"s3://{bucket}/{upload['Key']}", upload["UploadId"])
                for page in paginator.paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/")
                for upload in page.get("Uploads", []) if upload["Initiated"].timestamp() < cutoff]

    def abort_upload(self, uri: str, upload_id: str) -> None:
        bucket, key = storage.split_s3(uri)
        storage.s3_client().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)


class Registry:
    """A versioned model registry rooted at a local folder or ``s3://bucket/prefix``.

    Both backends share every rule below; they differ only in ``_LocalBackend`` and
    ``_S3Backend`` (create-if-absent, one-level listing, putting a version's files in place).
    """

    def __init__(self, root: str | Path):
        root = str(root)
        if not root:
            raise ValueError("registry root is empty; give a folder or s3://bucket/prefix")
        if storage.is_s3(root):
            storage.split_s3(root)  # fails clearly on "s3://" without a bucket
            self.root = root.rstrip("/")
            self._backend: _LocalBackend | _S3Backend = _S3Backend()
        else:
            self.root = str(Path(root).expanduser())
            self._backend = _LocalBackend()

    def __repr__(self) -> str:
        return f"Registry({self.root!r})"

    # ------------------------------------------------------------------ public API

    def register(self, name: str, model_dir: str | Path, manifest: dict[str, Any]) -> ModelVersion:
        """Copy ``model_dir`` in as the next version of ``name`` and return it.

        The registry adds to a copy of ``manifest``: ``files`` (``{relpath: {"sha256",
        "bytes"}}`` for every file), ``created_at`` (UTC ISO 8601), ``name`` and ``version``;
        those four keys are the registry's and override any the caller passed.

        Only regular files inside ``model_dir`` are copied. A symlink that resolves outside
        it raises ``UnsafePathError`` naming the link (a link to a credentials file is never
        copied in); a symlink to a file inside is followed (its bytes are registered under
        the link's name), one to a folder inside is skipped (its files are registered under
        their real path). A fifo, socket or device raises ``UnsafePathError`` too.

        Example: two calls on an empty root return versions 1 and 2; if a crashed
        registration had claimed 2, they return 1 and 3.
        """
        validate_name(name)
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise NotFoundError(f"model_dir {str(model_dir)!r} is not a folder")
        # A copy that must serialise now: failing after the claim would burn a number.
        manifest = json.loads(json.dumps(manifest))
        if not isinstance(manifest, dict):
            raise ValueError(f"manifest must be a dict, got {type(manifest).__name__}")

        sources = _model_files(model_dir)
        if not sources:
            raise ValueError(f"model_dir {str(model_dir)!r} holds no files")

        staging_uri = self._uri(name, ".staging", uuid.uuid4().hex)
        try:
            files = self._backend.stage(staging_uri, sources)
            version = self._claim_next_version(name)
            manifest.update(files=files, created_at=_utc_now_iso(), name=name, version=version)
            # The manifest goes in last: it is what makes a version count as complete.
            self._backend.publish(staging_uri, self._version_uri(name, version), sources,
                                  _dump_json(manifest))
        except BaseException:
            # Best effort: a killed process leaves its staging folder, which nothing reads
            # (Registry.gc removes it).
            self._backend.discard(staging_uri)
            raise
        return ModelVersion(name, version, self._version_uri(name, version), manifest)

    def get(self, name: str, version_or_alias: int | str = "latest") -> ModelVersion:
        """Return one complete version: ``"latest"``, a number (int or ASCII digits) or an alias.

        ``"latest"`` is the newest valid version: a newer broken one (its manifest fails the
        checks) is skipped with a ``RegistryWarning`` naming it. A broken version asked for by
        number or alias raises its ``InvalidManifestError`` or ``UnsafePathError``.

        Raises ``NotFoundError`` when the model, the version or the alias is missing.
        """
        validate_name(name)
        if version_or_alias == "latest":
            return self._latest(name)
        return self._load(name, self._resolve(name, version_or_alias))

    def list(self, name: str) -> list[ModelVersion]:
        """All valid versions of ``name``, oldest first (empty if there are none).

        A broken version is left out with a ``RegistryWarning`` that names its manifest and
        the problem (``get`` of it raises); one broken version never hides the others.
        """
        validate_name(name)
        versions, broken = self._scan(name)
        for version, error in broken.items():
            _warn_broken(name, version, error, stacklevel=3)
        return versions

    def list_models(self) -> list[str]:
        """Sorted names of the models with at least one complete (perhaps broken) version."""
        return sorted(entry for entry in self._backend.list_children(self.root)
                      if _is_name(entry) and self._complete_versions(entry))

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        who: str | None = None,
        run: str | None = None,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """Point ``alias`` at ``version`` and record the move in the alias history.

        ``who`` defaults to ``$METAFLOW_USER``, then ``$USER``. Returns the history entry:
        ``{"alias", "version", "previous_version", "who", "when", "run", "reason", "seq"}``.
        """
        validate_alias(alias)
        version = self.get(name, _as_version_number(version)).version
        while True:
            seq, current = self._latest_alias_entry(name, alias)
            entry = self._try_move_alias(name, alias, version, seq, current, who=who, run=run, reason=reason)
            if entry is not None:
                return entry
            # Another process moved the alias between our read and our write: read again.

    def aliases(self, name: str) -> dict[str, int]:
        """``{alias: version}`` for every alias of ``name``."""
        validate_name(name)
        result = {}
        for alias in sorted(self._backend.list_children(self._uri(name, "aliases"))):
            if _is_alias(alias):
                _, entry = self._latest_alias_entry(name, alias)
                if entry is not None:
                    result[alias] = int(entry["version"])
        return result

    def alias_history(self, name: str) -> list[dict[str, Any]]:
        """Every alias move of ``name``, oldest first (by time, then alias, then ``seq``)."""
        validate_name(name)
        entries = []
        for alias in self._backend.list_children(self._uri(name, "aliases")):
            if _is_alias(alias):
                for seq in self._alias_seqs(name, alias):
                    entries.append(json.loads(storage.read_bytes(self._alias_entry_uri(name, alias, seq))))
        return sorted(entries, key=lambda entry: (entry["when"], entry["alias"], entry["seq"]))

    def promotion(self, name: str, version_or_alias: int | str) -> dict[str, Any] | None:
        """The last gate decision recorded about a version (``promotion.json``), or ``None``."""
        model_version = self.get(name, version_or_alias)
        try:
            return json.loads(storage.read_bytes(storage.join(model_version.uri, "promotion.json")))
        except FileNotFoundError:
            return None
        except Exception as error:  # boto3 reports a missing key as ClientError / NoSuchKey
            if _is_missing_object(error):
                return None
            raise

    def verify(self, name: str, version_or_alias: int | str = "latest") -> ModelVersion:
        """Re-hash every stored file of a version; raise ``ChecksumMismatch`` on the first bad one."""
        model_version = self.get(name, version_or_alias)
        for relpath, expected in sorted(model_version.manifest["files"].items()):
            with storage.open_read(storage.join(model_version.uri, relpath)) as reader:
                sha256, num_bytes = _hash_stream(reader)
            _check_file(relpath, expected, sha256, num_bytes)
        return model_version

    def download(self, name: str, version_or_alias: int | str, dest: str | Path) -> Path:
        """Copy a version's files and ``manifest.json`` into the local ``dest``, verifying every sha256.

        The files go to a staging folder beside ``dest`` (``.<dest name>.partial-<uuid>``),
        hashed as they are copied, so what lands is what was checked; only when every file
        matches is it renamed to ``dest``. On any failure (``ChecksumMismatch`` naming the
        file, an interruption) the staging folder is removed and ``dest`` stays as it was. An
        unsafe manifest is refused before anything is written.

        ``dest`` may be missing, an empty folder, or an earlier pull of the same name and
        version (its ``manifest.json`` says so and it holds nothing else), which is replaced.
        Anything else raises ``DestinationExistsError``: a user's folder is never merged into
        or deleted. Returns ``dest``.

        Example::

            reg.download("tiny-sft", "champion", "models/tiny")  # -> Path("models/tiny")
            reg.download("tiny-sft", "champion", "models/tiny")  # the same again: a fresh copy
            reg.download("tiny-sft", 1, "models/tiny")           # v1 there: DestinationExistsError
        """
        model_version = self.get(name, version_or_alias)
        dest = Path(dest)
        final = Path(os.path.abspath(dest))
        replace = self._check_destination(final, model_version)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            for relpath, expected in sorted(model_version.manifest["files"].items()):
                target = _target_inside(staging, relpath, where=storage.join(model_version.uri, "manifest.json"))
                with storage.open_read(storage.join(model_version.uri, relpath)) as reader:
                    sha256, num_bytes = _copy_stream_hashed(reader, target)
                _check_file(relpath, expected, sha256, num_bytes)
            (staging / "manifest.json").write_bytes(_dump_json(model_version.manifest))
            _move_into_place(staging, final, replace=replace)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return dest

    def gc(self, grace_s: float = 24 * 3600, dry_run: bool = False) -> list[str]:
        """Remove what killed registrations left behind; return what was (or would be) removed.

        Debris is what no complete version owns: a local ``.staging/<uuid>/`` folder, a
        ``versions/<N>/`` without ``manifest.json`` (on S3, the files of a registration killed
        before its manifest), the temp file of a killed create-if-absent, and on S3 an
        incomplete multipart upload (listed as ``<uri> (incomplete upload)``). Each goes only
        when everything in it is older than ``grace_s`` seconds: a registration in progress
        keeps writing, so it stays young. Complete versions, claims (a claimed number stays
        skipped) and aliases are never touched. What a killed ``gc`` set aside (``.gc-<uuid>``)
        goes at once. ``dry_run`` lists without removing.

        Example, after a registration was killed while uploading version 2 to S3::

            reg.gc(grace_s=0)  # -> ["s3://bucket/registry/tiny/versions/2"]; claims/2 stays
        """
        if not grace_s >= 0:
            raise ValueError(f"grace_s must be >= 0 seconds, got {grace_s!r}")
        cutoff = time.time() - grace_s
        removed = []
        for name in sorted(entry for entry in self._backend.list_children(self.root) if _is_name(entry)):
            for uri, manifest_uri in self._debris(name, cutoff):
                if not dry_run:
                    # A version folder is owned after all if its manifest appeared since we looked.
                    if manifest_uri is not None and storage.exists(manifest_uri):
                        continue
                    self._backend.remove_tree(uri)
                removed.append(uri)
            for uri, upload_id in self._backend.stale_uploads(self._uri(name), cutoff):
                if not dry_run:
                    self._backend.abort_upload(uri, upload_id)
                removed.append(f"{uri} (incomplete upload)")
        return removed

    def promote_if_better(
        self,
        name: str,
        version: int,
        *,
        metric: str,
        min_delta: float,
        mode: str = "max",
        alias: str = "champion",
        run: str | None = None,
    ) -> dict[str, Any]:
        """The promotion gate: move ``alias`` to ``version`` only if it beats the holder.

        "Beats" means ``candidate - champion >= min_delta`` for ``mode="max"`` and
        ``champion - candidate >= min_delta`` for ``mode="min"``, reading
        ``manifest["metrics"][metric]`` of both. Both must be scored on the same eval set by
        the same evaluators: when their ``manifest["eval_set"]`` ``fingerprint`` or ``scorers``
        (evaluator versions) differ (or only one has them), the numbers are not comparable and
        the alias stays. With no current holder the candidate
        is promoted. A holder without the metric is not replaced (use ``set_alias`` to
        override by hand).

        Manifests are immutable, so the decision is returned and written to
        ``versions/<N>/promotion.json`` beside the version (outside the checksummed files);
        ``Registry.promotion`` reads it back. Read, decide and move are one compare-and-swap
        on the alias history: if another process moves the alias in between, the gate decides
        again against the new holder.

        Example, ``mode="min"`` on ``eval_loss`` with ``min_delta=0.05``: champion 2.00,
        candidate 1.97 -> not promoted (0.03 < 0.05); candidate 1.90 -> promoted.
        """
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        validate_alias(alias)
        candidate = self.get(name, _as_version_number(version))
        candidate_value = _metric_of(candidate, metric)
        if candidate_value is None:
            raise ValueError(
                f"version {candidate.version} of {name!r} has no metric {metric!r} in its manifest"
            )
        candidate_eval_set = _eval_set_of(candidate)
        while True:
            seq, current = self._latest_alias_entry(name, alias)
            champion_version = None if current is None else int(current["version"])
            champion_value = champion_eval_set = None
            if champion_version is not None:
                champion = self.get(name, champion_version)
                champion_value, champion_eval_set = _metric_of(champion, metric), _eval_set_of(champion)
            promoted, reason = _gate_decision(
                candidate.version, candidate_value, champion_version, champion_value,
                min_delta=min_delta, mode=mode, alias=alias, metric=metric,
                candidate_eval_set=candidate_eval_set, champion_eval_set=champion_eval_set,
            )
            if promoted and self._try_move_alias(
                name, alias, candidate.version, seq, current, who=None, run=run, reason=reason
            ) is None:
                continue  # the alias moved under us: decide again against its new holder
            break
        decision = {
            "promoted": promoted,
            "alias": alias,
            "metric": metric,
            "mode": mode,
            "version": candidate.version,
            "candidate_value": candidate_value,
            "champion_version": champion_version,
            "champion_value": champion_value,
            "candidate_eval_set": candidate_eval_set,
            "champion_eval_set": champion_eval_set,
            "min_delta": min_delta,
            "reason": reason,
            "run": run,
            "decided_at": _utc_now_iso(),
        }
        storage.write_bytes(storage.join(candidate.uri, "promotion.json"), _dump_json(decision))
        return decision

    # ------------------------------------------------------------------ internals

    def _uri(self, name: str, *parts: str) -> str:
        return storage.join(self.root, name, *parts)

    def _version_uri(self, name: str, version: int) -> str:
        return self._uri(name, "versions", str(version))

    def _manifest_uri(self, name: str, version: int) -> str:
        return storage.join(self._version_uri(name, version), "manifest.json")

    def _root_exists(self) -> bool:
        return self._backend.root_exists(self.root)

    def _read_manifest(self, name: str, version: int) -> dict[str, Any] | None:
        """The checked manifest of ``version``; None if it has none (not complete, or missing)."""
        uri = self._manifest_uri(name, version)
        try:
            data = storage.read_bytes(uri)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:  # a folder named manifest.json, no permission
            raise InvalidManifestError(uri, f"cannot be read ({error.strerror or type(error).__name__})") from None
        except Exception as error:
            if _is_missing_object(error):
                return None
            raise
        return _parse_manifest(data, uri)

    def _load(self, name: str, version: int) -> ModelVersion:
        manifest = self._read_manifest(name, version)
        if manifest is None:
            raise NotFoundError(f"model {name!r} has no complete version {version}")
        return ModelVersion(name, version, self._version_uri(name, version), manifest)

    def _complete_versions(self, name: str) -> list[int]:
        """Numbers of the versions that have a manifest (valid or broken), ascending."""
        versions = []
        for entry in self._backend.list_children(self._uri(name, "versions")):
            if _VERSION_PATTERN.fullmatch(entry) and storage.exists(self._manifest_uri(name, int(entry))):
                versions.append(int(entry))
        return sorted(versions)

    def _scan(self, name: str) -> tuple[list[ModelVersion], dict[int, RegistryError]]:
        """``(valid versions oldest first, {number: error} of the broken ones)``."""
        versions, broken = [], {}
        for version in self._complete_versions(name):
            try:
                versions.append(self._load(name, version))
            except _BROKEN_VERSION_ERRORS as error:
                broken[version] = error
            except NotFoundError:
                pass  # gone since it was listed
        return versions, broken

    def _latest(self, name: str) -> ModelVersion:
        """The newest valid version; warns about newer broken ones, raises if all are broken."""
        versions = self._complete_versions(name)
        if not versions:
            raise NotFoundError(f"model {name!r} has no complete version in {self.root!r}")
        skipped: dict[int, RegistryError] = {}
        for version in reversed(versions):
            try:
                found = self._load(name, version)
            except _BROKEN_VERSION_ERRORS as error:
                skipped[version] = error
                continue
            for broken_version, error in skipped.items():
                _warn_broken(name, broken_version, error, stacklevel=4)
            return found
        # Every version is broken: say why the newest is, rather than fall back to anything.
        raise skipped[versions[-1]]

    def _resolve(self, name: str, version_or_alias: int | str) -> int:
        """The version number that ``version_or_alias`` (a number or an alias, not "latest") names."""
        validate_name(name)
        if isinstance(version_or_alias, bool):
            raise ValueError(f"version must be an int, a digit string or an alias, got {version_or_alias!r}")
        if isinstance(version_or_alias, int) or (
            isinstance(version_or_alias, str) and _DIGITS_PATTERN.fullmatch(version_or_alias)
        ):
            return _as_version_number(version_or_alias)
        alias = validate_alias(version_or_alias)
        _, entry = self._latest_alias_entry(name, alias)
        if entry is None:
            raise NotFoundError(f"model {name!r} has no alias {alias!r}")
        return int(entry["version"])

    def _claim_next_version(self, name: str) -> int:
        """Claim the lowest unused number above every claim and version, with create-if-absent."""
        versions = {int(e) for e in self._backend.list_children(self._uri(name, "versions"))
                    if _VERSION_PATTERN.fullmatch(e)}
        claims = {int(e) for e in self._backend.list_children(self._uri(name, "claims"))
                  if _VERSION_PATTERN.fullmatch(e)}
        version = max(versions | claims, default=0) + 1
        claim = _dump_json({"who": _default_user(), "host": socket.gethostname(), "pid": os.getpid(),
                            "claimed_at": _utc_now_iso()})
        # A number is ours once its claim is; a version folder without a claim (copied in by
        # hand) still blocks its number.
        while version in versions or not self._backend.put_if_absent(
            self._uri(name, "claims", str(version)), claim
        ):
            version += 1
        return version

    def _check_destination(self, dest: Path, model_version: ModelVersion) -> bool:
        """Whether ``dest`` is an earlier pull of ``model_version`` to replace (False: missing or
        empty); ``DestinationExistsError`` for anything else."""
        label = f"{model_version.name} v{model_version.version}"
        if not storage.is_s3(self.root) and _is_within(os.path.realpath(dest), os.path.realpath(self.root)):
            raise DestinationExistsError(dest, f"is inside the registry {self.root!r}")
        if not os.path.lexists(dest):
            return False
        if dest.is_symlink() or not dest.is_dir():
            raise DestinationExistsError(dest, "exists and is not a folder")
        if not os.listdir(dest):
            return False
        earlier = _earlier_pull_files(dest, model_version.name, model_version.version)
        if earlier is None:
            raise DestinationExistsError(dest, f"is not empty and is not an earlier pull of {label}")
        stray = _first_stray_entry(dest, earlier)
        if stray is not None:
            raise DestinationExistsError(
                dest, f"holds {_short(stray)}, which is not part of the earlier pull of {label}")
        return True

    def _debris(self, name: str, cutoff: float) -> list[tuple[str, str | None]]:
        """``(uri, manifest uri that would make it owned, or None)`` of what ``gc`` removes."""
        found: list[tuple[str, str | None]] = []
        staging = self._uri(name, ".staging")
        for entry in sorted(self._backend.list_children(staging)):
            uri = storage.join(staging, entry)
            if _TRASH_PATTERN.fullmatch(entry) or self._older_than(uri, cutoff):
                found.append((uri, None))
        versions = self._uri(name, "versions")
        for entry in sorted(self._backend.list_children(versions)):
            uri = storage.join(versions, entry)
            if _TRASH_PATTERN.fullmatch(entry):
                found.append((uri, None))
            elif _VERSION_PATTERN.fullmatch(entry):
                manifest_uri = self._manifest_uri(name, int(entry))
                if not storage.exists(manifest_uri) and self._older_than(uri, cutoff):
                    found.append((uri, manifest_uri))
        folders = [self._uri(name, "claims")] + [
            self._uri(name, "aliases", alias, "history")
            for alias in sorted(self._backend.list_children(self._uri(name, "aliases")))
        ]
        for folder in folders:
            for entry in sorted(self._backend.list_children(folder)):
                uri = storage.join(folder, entry)
                if _TEMP_FILE_PATTERN.fullmatch(entry) and self._older_than(uri, cutoff):
                    found.append((uri, None))
        return found

    def _older_than(self, uri: str, cutoff: float) -> bool:
        newest = self._backend.newest_mtime(uri)
        return newest is not None and newest < cutoff

    def _alias_entry_uri(self, name: str, alias: str, seq: int) -> str:
        return self._uri(name, "aliases", alias, "history", f"{seq}.json")

    def _alias_seqs(self, name: str, alias: str) -> list[int]:
        entries = self._backend.list_children(self._uri(name, "aliases", alias, "history"))
        return sorted(int(e.removesuffix(".json")) for e in entries
                      if e.endswith(".json") and _VERSION_PATTERN.fullmatch(e.removesuffix(".json")))

    def _latest_alias_entry(self, name: str, alias: str) -> tuple[int, dict[str, Any] | None]:
        """``(seq, entry)`` of the alias's newest history entry; ``(0, None)`` if it was never set."""
        seqs = self._alias_seqs(name, alias)
        if not seqs:
            return 0, None
        return seqs[-1], json.loads(storage.read_bytes(self._alias_entry_uri(name, alias, seqs[-1])))

    def _try_move_alias(
        self, name: str, alias: str, version: int, seq: int, current: dict[str, Any] | None,
        *, who: str | None, run: str | None, reason: str | None,
    ) -> dict[str, Any] | None:
        """Claim history entry ``seq + 1``; the entry, or ``None`` if someone claimed it first."""
        entry = {
            "alias": alias,
            "version": version,
            "previous_version": None if current is None else int(current["version"]),
            "who": who or _default_user(),
            # Microseconds, so alias_history orders moves made within the same second.
            "when": _utc_now_iso("microseconds"),
            "run": run,
            "reason": reason,
            "seq": seq + 1,
        }
        if self._backend.put_if_absent(self._alias_entry_uri(name, alias, seq + 1), _dump_json(entry)):
            return entry
        return None


# ---------------------------------------------------------------------- small pure helpers


def _dump_json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _is_name(entry: str) -> bool:
    return _passes(validate_name, entry)


def _is_alias(entry: str) -> bool:
    return _passes(validate_alias, entry)


def _passes(validate: Callable[[str], str], entry: str) -> bool:
    try:
        validate(entry)
    except ValueError:
        return False
    return True


def _raise(error: OSError) -> None:
    """``os.walk``'s ``onerror``: an unreadable folder is an error, not something to skip."""
    raise error


def _error_code(error: Exception) -> str | None:
    return getattr(error, "response", {}).get("Error", {}).get("Code")


def _is_missing_object(error: Exception) -> bool:
    """Whether a boto3 error means "no such key" (storage.read_bytes raises it as is)."""
    return _error_code(error) in ("NoSuchKey", "404", "NotFound")


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters: an error message never carries a huge value.

    Example:
        >>> _short("weights.bin")
        "'weights.bin'"
        >>> _short("a/" * 5000, limit=12)
        "'a/a/a/a/a/... (10000 characters)"
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, (str, bytes)) else len(text)
    return f"{text[:limit - 1]}... ({size} characters)"


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _as_version_number(version: int | str) -> int:
    """A version number from an int or a string of ASCII digits; ``ValueError`` for anything else.

    Example:
        >>> _as_version_number("12"), _as_version_number(3)
        (12, 3)
        >>> _as_version_number("²")
        Traceback (most recent call last):
        ...
        ValueError: version must be a number (ASCII digits), got '²'
    """
    if isinstance(version, int) and not isinstance(version, bool) and 0 <= version < 10**30:
        return version
    if isinstance(version, str) and _VERSION_STRING_PATTERN.fullmatch(version):
        return int(version)
    raise ValueError(f"version must be a number (ASCII digits), got {_short(version)}")


def _warn_broken(name: str, version: int, error: RegistryError, *, stacklevel: int) -> None:
    warnings.warn(f"skipping broken version {version} of {name!r}: {error}", RegistryWarning,
                  stacklevel=stacklevel)


# ---------------------------------------------------------------------- paths from outside


def _unsafe_relpath_reason(relpath: Any) -> str | None:
    r"""Why ``relpath`` is not a safe relative file path, or None if it is.

    Safe: ``/``-separated, relative, every component a real name (not empty, ``.`` or ``..``,
    at most 255 bytes), valid UTF-8, no backslash, no NUL or other control character.

    Example:
        >>> _unsafe_relpath_reason("tokenizer/tokenizer.json") is None
        True
        >>> for path in ["../x", "/etc/passwd", "a\\b", "a//b", "a/./b", "a\0b"]:
        ...     print(repr(path), _unsafe_relpath_reason(path))
        '../x' has a '..' component
        '/etc/passwd' is absolute
        'a\\b' holds a backslash
        'a//b' has an empty component
        'a/./b' has a '.' component
        'a\x00b' holds a NUL or control character
    """
    if not isinstance(relpath, str):
        return f"is a {type(relpath).__name__}, not a string"
    if not relpath:
        return "is empty"
    if any(ord(char) < 32 or ord(char) == 127 for char in relpath):
        return "holds a NUL or control character"
    if "\\" in relpath:
        return "holds a backslash"
    if relpath.startswith("/"):
        return "is absolute"
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    for part in relpath.split("/"):
        if part in ("", ".", ".."):
            return "has an empty component" if not part else f"has a {part!r} component"
        if len(part.encode("utf-8")) > _MAX_COMPONENT_BYTES:
            return f"has a component longer than {_MAX_COMPONENT_BYTES} bytes"
    return None


def _is_within(path: str, folder: str) -> bool:
    """Whether the absolute ``path`` is ``folder`` or below it (both already resolved)."""
    return os.path.commonpath([folder, path]) == folder


def _target_inside(folder: Path, relpath: str, *, where: str) -> Path:
    """``folder / relpath``, after checking that it resolves inside ``folder``."""
    reason = _unsafe_relpath_reason(relpath)
    target = folder / relpath
    if reason is None and not _is_within(os.path.realpath(target), os.path.realpath(folder)):
        reason = f"resolves outside {str(folder)!r}"
    if reason is not None:
        raise UnsafePathError(where, relpath, reason)
    return target


def _parse_manifest(data: bytes, uri: str) -> dict[str, Any]:
    """The manifest stored at ``uri``, checked; ``InvalidManifestError`` or ``UnsafePathError`` naming ``uri``.

    Example:
        >>> _parse_manifest(b'{"files": {}}', "v1/manifest.json")
        Traceback (most recent call last):
        ...
        steps.registry.InvalidManifestError: v1/manifest.json: 'files' is empty; a version holds at least one file
        >>> _parse_manifest(b'{"files": {"../x": {"sha256": "", "bytes": 0}}}', "v1/manifest.json")
        Traceback (most recent call last):
        ...
        steps.registry.UnsafePathError: v1/manifest.json: unsafe path '../x': has a '..' component
    """
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as error:
        problem = f"is not JSON ({error.msg} at line {error.lineno} column {error.colno})"
        raise InvalidManifestError(uri, problem) from None
    except UnicodeDecodeError:
        raise InvalidManifestError(uri, "is not UTF-8 text") from None
    except (ValueError, RecursionError) as error:  # a number of 5000 digits, nesting 10000 deep
        raise InvalidManifestError(uri, f"is not JSON the registry can read ({type(error).__name__})") from None
    if not isinstance(manifest, dict):
        raise InvalidManifestError(uri, f"is a JSON {_json_type(manifest)}, not an object")
    if "files" not in manifest:
        raise InvalidManifestError(uri, "has no 'files'")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise InvalidManifestError(uri, f"'files' is a JSON {_json_type(files)}, not an object")
    if not files:
        raise InvalidManifestError(uri, "'files' is empty; a version holds at least one file")
    folders = set()
    for relpath, entry in files.items():
        reason = _unsafe_relpath_reason(relpath)
        if reason is not None:
            raise UnsafePathError(uri, relpath, reason)
        if relpath in _REGISTRY_FILE_NAMES:
            raise InvalidManifestError(uri, f"'files' lists {relpath!r}, a file the registry writes itself")
        where = f"files[{_short(relpath)}]"
        if not isinstance(entry, dict):
            raise InvalidManifestError(uri, f"{where} is a JSON {_json_type(entry)}, not an object")
        sha256, num_bytes = entry.get("sha256"), entry.get("bytes")
        if not isinstance(sha256, str) or not _SHA256_PATTERN.fullmatch(sha256):
            raise InvalidManifestError(uri, f"{where} has no 'sha256' of 64 lowercase hex digits")
        if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 0:
            raise InvalidManifestError(uri, f"{where} has no 'bytes' (a non-negative integer)")
        parts = relpath.split("/")
        folders.update("/".join(parts[:end]) for end in range(1, len(parts)))
    clash = sorted(folders & files.keys())
    if clash:
        raise InvalidManifestError(uri, f"'files' lists {_short(clash[0])} both as a file and as a folder")
    return manifest


def _model_files(model_dir: Path) -> dict[str, Path]:
    """``{relpath: file to read}`` of what ``Registry.register`` copies from ``model_dir``, sorted.

    Regular files inside the folder only: a symlink that resolves outside it raises
    ``UnsafePathError`` naming the link; one to a file inside is followed (read from its
    target, registered under the link's own name); one to a folder inside is skipped (its
    files are registered under their real path, and following it could loop). The
    registry's own top-level ``manifest.json`` and ``promotion.json`` (a pulled copy being
    registered again) are not model files.
    """
    where, root = str(model_dir), os.path.realpath(model_dir)
    files = {}
    for folder, dirnames, filenames in os.walk(root, onerror=_raise):
        for entry in sorted(dirnames + filenames):
            path = os.path.join(folder, entry)
            relpath = os.path.relpath(path, root).replace(os.sep, "/")
            if relpath in _REGISTRY_FILE_NAMES:
                continue
            if os.path.islink(path):
                target = os.path.realpath(path)
                if not _is_within(target, root):
                    raise UnsafePathError(where, relpath, f"is a symlink to {_short(target)}, outside the folder; "
                                                          "copy the file in if it belongs to the model")
                if os.path.isdir(target):
                    continue
                path = target
            elif entry in dirnames:
                continue
            reason = _unsafe_relpath_reason(relpath)
            if reason is not None:
                raise UnsafePathError(where, relpath, reason)
            try:
                mode = os.stat(path).st_mode
            except OSError as error:
                raise UnsafePathError(where, relpath, f"cannot be read ({error.strerror})") from None
            if not stat.S_ISREG(mode):
                raise UnsafePathError(where, relpath, "is not a regular file (a fifo, socket or device)")
            files[relpath] = Path(path)
    return dict(sorted(files.items()))


def _earlier_pull_files(dest: Path, name: str, version: int) -> set[str] | None:
    """The relpaths a pull of ``name`` v``version`` left in ``dest``, if its ``manifest.json`` says
    it is one; else None."""
    try:
        manifest = json.loads((dest / "manifest.json").read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict) or manifest.get("name") != name:
        return None
    if type(manifest.get("version")) is not int or manifest["version"] != version:
        return None
    files = manifest.get("files")
    return set(files) | {"manifest.json"} if isinstance(files, dict) else None


def _first_stray_entry(dest: Path, pulled: set[str]) -> str | None:
    """The first entry under ``dest`` that a pull did not write (a link, a file or folder not in
    ``pulled``), or None: replacing ``dest`` then loses nothing of the user's."""
    folders = {"/".join(p.split("/")[:end]) for p in pulled for end in range(1, p.count("/") + 1)}
    for folder, dirnames, filenames in os.walk(dest, onerror=_raise):
        for entry in sorted(dirnames + filenames):
            path = os.path.join(folder, entry)
            relpath = os.path.relpath(path, dest).replace(os.sep, "/")
            if os.path.islink(path):
                return relpath
            if entry in dirnames:
                if relpath not in folders:
                    return relpath
            elif relpath not in pulled or not os.path.isfile(path):
                return relpath
    return None


def _move_into_place(staging: Path, dest: Path, *, replace: bool) -> None:
    """Rename the verified ``staging`` folder to ``dest`` (missing or empty, or an earlier pull to
    replace: set aside, then removed once the new copy is in place)."""
    if not replace:
        try:
            os.rename(staging, dest)  # onto a missing or empty folder only
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise DestinationExistsError(dest, "was filled by someone else during the pull") from None
            raise
        return
    aside = dest.with_name(f".{dest.name}.replaced-{uuid.uuid4().hex}")
    os.rename(dest, aside)
    try:
        os.rename(staging, dest)
    except BaseException:
        os.rename(aside, dest)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _hash_stream(reader: BinaryIO) -> tuple[str, int]:
    digest = hashlib.sha256()
    num_bytes = 0
    while chunk := reader.read(_COPY_CHUNK_BYTES):
        digest.update(chunk)
        num_bytes += len(chunk)
    return digest.hexdigest(), num_bytes


def _copy_stream_hashed(reader: BinaryIO, target: Path) -> tuple[str, int]:
    """Copy ``reader`` to the local file ``target`` (fsynced); sha256 and size of the bytes copied."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    num_bytes = 0
    with open(target, "xb") as writer:  # exclusive: never through a link, never over a file
        while chunk := reader.read(_COPY_CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
            num_bytes += len(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest(), num_bytes


def _check_file(relpath: str, expected: dict[str, Any], sha256: str, num_bytes: int) -> None:
    if sha256 != expected["sha256"] or num_bytes != expected["bytes"]:
        raise ChecksumMismatch(relpath, expected["sha256"], sha256)


def _metric_of(model_version: ModelVersion, metric: str) -> float | None:
    value = (model_version.manifest.get("metrics") or {}).get(metric)
    return None if value is None else float(value)


def _eval_set_of(model_version: ModelVersion) -> str | None:
    """The fingerprint of the eval split the version's metrics were computed on, if recorded,
    followed by `` scored by <scorers>`` where the manifest names its evaluators' versions."""
    eval_set = model_version.manifest.get("eval_set") or {}
    fingerprint, scorers = eval_set.get("fingerprint"), eval_set.get("scorers")
    return f"{fingerprint} scored by {scorers}" if fingerprint and scorers else fingerprint


def _gate_decision(
    candidate_version: int,
    candidate_value: float,
    champion_version: int | None,
    champion_value: float | None,
    *,
    min_delta: float,
    mode: str,
    alias: str,
    metric: str,
    candidate_eval_set: str | None = None,
    champion_eval_set: str | None = None,
) -> tuple[bool, str]:
    """Return ``(promoted, reason)``; see ``Registry.promote_if_better``.

    Example:
        >>> _gate_decision(3, 0.7, 2, 0.6, min_delta=0.05, mode="max", alias="champion",
        ...                metric="task_score", candidate_eval_set="e1", champion_eval_set="e1")
        (True, 'promoted: task_score 0.7 vs champion v2 0.6 (higher is better, improvement 0.1, min_delta 0.05)')
        >>> _gate_decision(3, 0.7, 2, 0.6, min_delta=0.05, mode="max", alias="champion",
        ...                metric="task_score", candidate_eval_set="e2", champion_eval_set="e1")[1]
        "kept: champion v2 was scored on eval set 'e1', the candidate on 'e2'; the numbers are not comparable"
    """
    if math.isnan(candidate_value):
        return False, f"candidate {metric} is NaN"
    if champion_version is None:
        return True, f"no current {alias}"
    if champion_version == candidate_version:
        return False, f"version {candidate_version} already is {alias}"
    if candidate_eval_set != champion_eval_set:
        return False, (
            f"kept: {alias} v{champion_version} was scored on eval set {champion_eval_set!r}, "
            f"the candidate on {candidate_eval_set!r}; the numbers are not comparable"
        )
    if champion_value is None or math.isnan(champion_value):
        return False, f"{alias} v{champion_version} has no comparable {metric}; use set_alias to override"
    improvement = candidate_value - champion_value if mode == "max" else champion_value - candidate_value
    # A tolerance for float noise: 0.6 - 0.5 is 0.0999..., which should still pass min_delta=0.1.
    beats = improvement >= min_delta or math.isclose(improvement, min_delta, rel_tol=1e-9, abs_tol=1e-12)
    better = "higher" if mode == "max" else "lower"
    verdict = "promoted" if beats else "kept"
    return beats, (
        f"{verdict}: {metric} {candidate_value:.6g} vs {alias} v{champion_version} {champion_value:.6g} "
        f"({better} is better, improvement {improvement:.6g}, min_delta {min_delta:.6g})"
    )


# ---------------------------------------------------------------------- command line


def _format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces.

    Example:
        >>> print(_format_table(["version", "run"], [["1", "SFTFlow/7"], ["12", "-"]]))
        version  run
        1        SFTFlow/7
        12       -
    """
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _key_metrics(manifest: dict[str, Any], max_metrics: int = 4) -> str:
    metrics = manifest.get("metrics") or {}
    ordered = reported(metrics) + sorted(key for key in metrics if key not in METRICS)
    return " ".join(f"{key}={_format_value(metrics[key])}" for key in ordered[:max_metrics]) or "-"


def _run_of(manifest: dict[str, Any]) -> str:
    return str(manifest.get("run_pathspec") or manifest.get("run") or "-")


def _versions_table(registry: Registry, name: str) -> str:
    """One row per version; a broken one says ``broken: <problem>`` in the metrics column (and
    is warned about with its manifest's URI). ``NotFoundError`` for an unknown model."""
    versions, broken = registry._scan(validate_name(name))
    if not versions and not broken:
        raise NotFoundError(f"model {name!r} has no complete version in {registry.root!r}")
    aliases_by_version: dict[int, list[str]] = {}
    for alias, version in registry.aliases(name).items():
        aliases_by_version.setdefault(version, []).append(alias)
    rows = {
        v.version: [
            str(v.version),
            str(v.manifest.get("created_at", "-")),
            ",".join(sorted(aliases_by_version.get(v.version, []))) or "-",
            _key_metrics(v.manifest),
            _run_of(v.manifest),
        ]
        for v in versions
    }
    for version, error in broken.items():
        _warn_broken(name, version, error, stacklevel=2)
        aliases = ",".join(sorted(aliases_by_version.get(version, []))) or "-"
        rows[version] = [str(version), "-", aliases, f"broken: {error.problem}", "-"]
    return _format_table(["version", "created", "aliases", "metrics", "run"], [rows[v] for v in sorted(rows)])


def _models_table(registry: Registry) -> str:
    """One row per model; ``versions`` counts the valid ones and adds ``(+N broken)``."""
    rows = []
    for name in registry.list_models():
        versions, broken = registry._scan(name)
        aliases = registry.aliases(name)
        rows.append(
            [
                name,
                str(len(versions)) + (f" (+{len(broken)} broken)" if broken else ""),
                str(versions[-1].version) if versions else "-",
                " ".join(f"{alias}=v{version}" for alias, version in sorted(aliases.items())) or "-",
            ]
        )
    return _format_table(["model", "versions", "latest", "aliases"], rows)


def _show(registry: Registry, name: str, version_or_alias: str) -> str:
    v = registry.get(name, version_or_alias)
    aliases = [alias for alias, version in registry.aliases(name).items() if version == v.version]
    files = v.manifest.get("files", {})
    details = [
        ["name", v.name],
        ["version", str(v.version)],
        ["uri", v.uri],
        ["created", str(v.manifest.get("created_at", "-"))],
        ["aliases", ",".join(sorted(aliases)) or "-"],
        ["run", _run_of(v.manifest)],
        ["files", f"{len(files)} ({sum(f['bytes'] for f in files.values())} bytes)"],
    ]
    skipped = {"files", "metrics", "created_at", "name", "version", "run", "run_pathspec"}
    details += [[key, json.dumps(value, sort_keys=True)]
                for key, value in sorted(v.manifest.items()) if key not in skipped]
    sections = [_format_table(["field", "value"], details)]
    metrics = v.manifest.get("metrics") or {}
    if metrics:
        metric_rows = [[key, _format_value(metrics[key])] for key in sorted(metrics)]
        sections.append(_format_table(["metric", "value"], metric_rows))
    decision = registry.promotion(name, v.version)
    if decision is not None:
        sections.append(f"last gate decision: promoted={decision['promoted']} ({decision['reason']})")
    file_rows = [[relpath, str(entry["bytes"]), entry["sha256"]] for relpath, entry in sorted(files.items())]
    sections.append(_format_table(["file", "bytes", "sha256"], file_rows))
    return "\n\n".join(sections)


def _gc_report(removed: list[str], *, dry_run: bool) -> str:
    if not removed:
        return "nothing to remove"
    verb = "would remove" if dry_run else "removed"
    return "\n".join(f"{verb} {uri}" for uri in removed)


def _version_arg(text: str) -> int:
    try:
        return _as_version_number(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m steps.registry", description="Inspect and manage the model registry."
    )
    parser.add_argument("--root", required=True, help="registry root: a folder or s3://bucket/prefix")
    commands = parser.add_subparsers(dest="command", required=True)
    list_parser = commands.add_parser("list", help="list models, or the versions of one model")
    list_parser.add_argument("name", nargs="?")
    show_parser = commands.add_parser("show", help="show one version: lineage, metrics, files")
    show_parser.add_argument("name")
    show_parser.add_argument("version_or_alias")
    pull_parser = commands.add_parser("pull", help="copy a version to DEST, verifying checksums")
    pull_parser.add_argument("name")
    pull_parser.add_argument("version_or_alias")
    pull_parser.add_argument("dest")
    promote_parser = commands.add_parser(
        "promote", help="point an alias at a version (through the gate when --metric is given)"
    )
    promote_parser.add_argument("name")
    promote_parser.add_argument("version", type=_version_arg)
    promote_parser.add_argument("--alias", default="champion")
    promote_parser.add_argument(
        "--metric", help="gate on this manifest metric instead of moving the alias unconditionally"
    )
    promote_parser.add_argument("--min-delta", type=float, default=0.0)
    promote_parser.add_argument("--mode", choices=["max", "min"], default="max")
    promote_parser.add_argument("--reason", help="why, for the alias history (without --metric)")
    gc_parser = commands.add_parser(
        "gc", help="remove what killed registrations left behind (never a version, claim or alias)"
    )
    gc_parser.add_argument("--grace-hours", type=float, default=24.0,
                           help="keep anything younger than this: a registration may be in progress")
    gc_parser.add_argument("--dry-run", action="store_true", help="list what would be removed")
    args = parser.parse_args(argv)

    with warnings.catch_warnings():
        warnings.simplefilter("always", RegistryWarning)
        warnings.showwarning = _print_warning
        try:
            return _run_command(args)
        except (RegistryError, ValueError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except Exception as error:
            if not type(error).__module__.startswith(("botocore", "boto3", "s3transfer")):
                raise
            print(f"error: {error}", file=sys.stderr)  # no such bucket, no credentials, endpoint down
            return 1


def _run_command(args: argparse.Namespace) -> int:
    registry = Registry(args.root)
    if not registry._root_exists():
        raise NotFoundError(f"registry root {registry.root!r} does not exist")
    if args.command in ("show", "pull"):
        validate_name(args.name)
        if not registry._complete_versions(args.name):
            raise NotFoundError(f"model {args.name!r} has no complete version in {registry.root!r}")
    if args.command == "list":
        print(_versions_table(registry, args.name) if args.name else _models_table(registry))
    elif args.command == "show":
        print(_show(registry, args.name, args.version_or_alias))
    elif args.command == "pull":
        print(registry.download(args.name, args.version_or_alias, args.dest))
    elif args.command == "gc":
        dry_run = args.dry_run
        print(_gc_report(registry.gc(grace_s=args.grace_hours * 3600, dry_run=dry_run), dry_run=dry_run))
    elif args.metric:
        decision = registry.promote_if_better(
            args.name, args.version, metric=args.metric, min_delta=args.min_delta, mode=args.mode,
            alias=args.alias,
        )
        print(f"promoted={decision['promoted']}: {decision['reason']}")
    else:
        entry = registry.set_alias(args.name, args.alias, args.version, reason=args.reason or "manual promote")
        previous = f"v{entry['previous_version']}" if entry["previous_version"] else "unset"
        print(f"{args.name}: {args.alias} -> v{entry['version']} (was {previous})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
