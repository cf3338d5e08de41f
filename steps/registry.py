"""Versioned model registry on a local folder or an ``s3://bucket/prefix``.

Layout under the registry root (the same keys on both backends)::

    <root>/<name>/claims/<N>                       one small object per claimed version number
    <root>/<name>/versions/<N>/...                 the model files (Hugging Face format)
    <root>/<name>/versions/<N>/manifest.json       written LAST: the version exists once it does
    <root>/<name>/versions/<N>/promotion.json      the gate's decision about N (not checksummed)
    <root>/<name>/aliases/<alias>/history/<seq>.json   one object per move of an alias; the
                                                   highest ``seq`` is where the alias points now
    <root>/<name>/.staging/<uuid>/                 (local only) a registration in progress

Versions are immutable and numbered 1, 2, 3, ... A registration hashes the files, claims the
next number with a create-if-absent of ``claims/<N>`` (an exclusive create locally, a
conditional put with ``If-None-Match: "*"`` on S3; whoever loses the race tries N + 1), puts
the files under ``versions/<N>/`` and writes ``manifest.json`` last. Locally the files are
copied into a staging folder that is renamed into place; S3 has no rename, so the files are
uploaded straight under ``versions/<N>/``. Either way readers count a version only when its
``manifest.json`` exists, so a version is visible only once it is complete. A registration
killed midway leaves a claim without a manifest (the number is skipped, never reused) and
perhaps some files; nothing reads them.

An alias (``champion``, ``candidate``, any name) is its history: moving it claims
``history/<seq + 1>`` with the same create-if-absent, where ``seq`` is the highest entry the
mover read. Two concurrent moves cannot both claim the same ``seq``; the loser reads again and
decides again. This compare-and-swap also makes the promotion gate's read-decide-move race
free, on both backends, without locks.

Example::

    reg = Registry("/tmp/registry")            # or Registry("s3://bucket/registry")
    reg.register("tiny-sft", "ckpt/step-40", {"metrics": {"eval_loss": 2.1}})  # -> version 1
    reg.get("tiny-sft").version                                               # -> 1 ("latest")
    reg.promote_if_better("tiny-sft", 1, metric="eval_loss", min_delta=0.0, mode="min")
    # -> {"promoted": True, "reason": "no current champion", ...}; reg.get("tiny-sft", "champion") is v1

Command line::

    python -m steps.registry --root ROOT list [NAME]
    python -m steps.registry --root ROOT show NAME VERSION_OR_ALIAS
    python -m steps.registry --root ROOT pull NAME VERSION_OR_ALIAS DEST
    python -m steps.registry --root ROOT promote NAME VERSION [--alias champion] [--metric M ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from steps import storage
from steps.contracts import METRICS, reported

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
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

    A name starts with a letter or digit, then up to 127 of ``[A-Za-z0-9._-]``, and never
    contains ``..`` (so it can never climb out of the registry root).

    Example:
        >>> validate_name("tiny-sft_v2.1")
        'tiny-sft_v2.1'
        >>> validate_name("../x")
        Traceback (most recent call last):
        ...
        ValueError: invalid name '../x': must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ and not contain '..'
    """
    if not isinstance(value, str) or not _NAME_PATTERN.match(value) or ".." in value:
        raise ValueError(
            f"invalid {what} {value!r}: must match {_NAME_PATTERN.pattern} and not contain '..'"
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
    if alias.isdigit():
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
# an atomic create-if-absent, listing one level of a folder, and how a version's files are
# put in place before the manifest.


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
        """Names directly inside the folder ``uri`` (empty if it does not exist)."""
        try:
            return os.listdir(uri)
        except FileNotFoundError:
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
        """Nothing to clean: uploaded files without a manifest are invisible and never reused."""


class Registry:
    """A versioned model registry rooted at a local folder or ``s3://bucket/prefix``.

    Both backends share every rule below; they differ only in ``_LocalBackend`` and
    ``_S3Backend`` (create-if-absent, one-level listing, putting a version's files in place).
    """

    def __init__(self, root: str | Path):
        root = str(root)
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

        sources = {
            source.relative_to(model_dir).as_posix(): source
            for source in sorted(p for p in model_dir.rglob("*") if p.is_file())
        }
        sources = {
            relpath: source for relpath, source in sources.items() if relpath not in _REGISTRY_FILE_NAMES
        }
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
            # Best effort: a killed process leaves its staging folder, which nothing reads.
            self._backend.discard(staging_uri)
            raise
        return ModelVersion(name, version, self._version_uri(name, version), manifest)

    def get(self, name: str, version_or_alias: int | str = "latest") -> ModelVersion:
        """Return one complete version: ``"latest"``, a number (int or digits) or an alias.

        Raises ``NotFoundError`` when the model, the version or the alias is missing.
        """
        version = self._resolve(name, version_or_alias)
        manifest = self._read_manifest(name, version)
        if manifest is None:
            raise NotFoundError(f"model {name!r} has no complete version {version}")
        return ModelVersion(name, version, self._version_uri(name, version), manifest)

    def list(self, name: str) -> list[ModelVersion]:
        """All complete versions of ``name``, oldest first (empty if there are none)."""
        validate_name(name)
        return [self.get(name, version) for version in self._complete_versions(name)]

    def list_models(self) -> list[str]:
        """Sorted names of the models with at least one complete version."""
        names = []
        for entry in self._backend.list_children(self.root):
            if _NAME_PATTERN.match(entry) and ".." not in entry and self._complete_versions(entry):
                names.append(entry)
        return sorted(names)

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

        The hash is taken of the bytes as they are copied, so what lands in ``dest`` is what
        was checked. On a mismatch the bad copy is removed and ``ChecksumMismatch`` names
        the file. Returns ``dest``.
        """
        model_version = self.get(name, version_or_alias)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for relpath, expected in sorted(model_version.manifest["files"].items()):
            target = dest / relpath
            with storage.open_read(storage.join(model_version.uri, relpath)) as reader:
                sha256, num_bytes = _copy_stream_hashed(reader, target)
            try:
                _check_file(relpath, expected, sha256, num_bytes)
            except ChecksumMismatch:
                target.unlink()
                raise
        (dest / "manifest.json").write_bytes(_dump_json(model_version.manifest))
        return dest

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

    def _read_manifest(self, name: str, version: int) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self._manifest_uri(name, version)))
        except FileNotFoundError:
            return None
        except Exception as error:
            if _is_missing_object(error):
                return None
            raise

    def _complete_versions(self, name: str) -> list[int]:
        """Numbers of the versions that have a manifest, ascending."""
        versions = []
        for entry in self._backend.list_children(self._uri(name, "versions")):
            if entry.isdigit() and storage.exists(self._manifest_uri(name, int(entry))):
                versions.append(int(entry))
        return sorted(versions)

    def _resolve(self, name: str, version_or_alias: int | str) -> int:
        validate_name(name)
        if isinstance(version_or_alias, bool):
            raise ValueError(f"version must be an int, a digit string or an alias, got {version_or_alias!r}")
        if isinstance(version_or_alias, int) or (
            isinstance(version_or_alias, str) and version_or_alias.isdigit()
        ):
            return int(version_or_alias)
        if version_or_alias == "latest":
            versions = self._complete_versions(name)
            if not versions:
                raise NotFoundError(f"model {name!r} has no complete version in {self.root!r}")
            return versions[-1]
        alias = validate_alias(version_or_alias)
        _, entry = self._latest_alias_entry(name, alias)
        if entry is None:
            raise NotFoundError(f"model {name!r} has no alias {alias!r}")
        return int(entry["version"])

    def _claim_next_version(self, name: str) -> int:
        """Claim the lowest unused number above every claim and version, with create-if-absent."""
        versions = {int(e) for e in self._backend.list_children(self._uri(name, "versions")) if e.isdigit()}
        claims = {int(e) for e in self._backend.list_children(self._uri(name, "claims")) if e.isdigit()}
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

    def _alias_entry_uri(self, name: str, alias: str, seq: int) -> str:
        return self._uri(name, "aliases", alias, "history", f"{seq}.json")

    def _alias_seqs(self, name: str, alias: str) -> list[int]:
        entries = self._backend.list_children(self._uri(name, "aliases", alias, "history"))
        return sorted(int(e.removesuffix(".json")) for e in entries
                      if e.endswith(".json") and e.removesuffix(".json").isdigit())

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


def _is_alias(entry: str) -> bool:
    try:
        validate_alias(entry)
    except ValueError:
        return False
    return True


def _is_missing_object(error: Exception) -> bool:
    """Whether a boto3 error means "no such key" (storage.read_bytes raises it as is)."""
    code = getattr(error, "response", {}).get("Error", {}).get("Code")
    return code in ("NoSuchKey", "404", "NotFound")


def _as_version_number(version: int | str) -> int:
    is_number = isinstance(version, int) or (isinstance(version, str) and version.isdigit())
    if isinstance(version, bool) or not is_number:
        raise ValueError(f"version must be a number, got {version!r}")
    return int(version)


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
    with open(target, "wb") as writer:
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
    aliases_by_version: dict[int, list[str]] = {}
    for alias, version in registry.aliases(name).items():
        aliases_by_version.setdefault(version, []).append(alias)
    rows = [
        [
            str(v.version),
            str(v.manifest.get("created_at", "-")),
            ",".join(sorted(aliases_by_version.get(v.version, []))) or "-",
            _key_metrics(v.manifest),
            _run_of(v.manifest),
        ]
        for v in registry.list(name)
    ]
    return _format_table(["version", "created", "aliases", "metrics", "run"], rows)


def _models_table(registry: Registry) -> str:
    rows = []
    for name in registry.list_models():
        versions = registry.list(name)
        aliases = registry.aliases(name)
        rows.append(
            [
                name,
                str(len(versions)),
                str(versions[-1].version),
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
    promote_parser.add_argument("version", type=int)
    promote_parser.add_argument("--alias", default="champion")
    promote_parser.add_argument(
        "--metric", help="gate on this manifest metric instead of moving the alias unconditionally"
    )
    promote_parser.add_argument("--min-delta", type=float, default=0.0)
    promote_parser.add_argument("--mode", choices=["max", "min"], default="max")
    promote_parser.add_argument("--reason", help="why, for the alias history (without --metric)")
    args = parser.parse_args(argv)

    registry = Registry(args.root)
    try:
        if args.command == "list":
            print(_versions_table(registry, args.name) if args.name else _models_table(registry))
        elif args.command == "show":
            print(_show(registry, args.name, args.version_or_alias))
        elif args.command == "pull":
            print(registry.download(args.name, args.version_or_alias, args.dest))
        elif args.command == "promote":
            if args.metric:
                decision = registry.promote_if_better(
                    args.name, args.version, metric=args.metric, min_delta=args.min_delta, mode=args.mode,
                    alias=args.alias,
                )
                print(f"promoted={decision['promoted']}: {decision['reason']}")
            else:
                entry = registry.set_alias(
                    args.name, args.alias, args.version, reason=args.reason or "manual promote"
                )
                previous = f"v{entry['previous_version']}" if entry["previous_version"] else "unset"
                print(f"{args.name}: {args.alias} -> v{entry['version']} (was {previous})")
    except (RegistryError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
