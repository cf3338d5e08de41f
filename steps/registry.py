"""Versioned model registry on a local folder (an ``s3://`` backend slots in later).

Layout under the registry root::

    <root>/<name>/versions/<N>/            the model files (Hugging Face format) + manifest.json
    <root>/<name>/versions/<N>/promotion.json   the last gate decision about N (not checksummed)
    <root>/<name>/claims/<N>               one small file per claimed version number
    <root>/<name>/.staging/<uuid>/         a registration in progress
    <root>/<name>/aliases/<alias>.json     {"version": N, ...}: a movable pointer such as "champion"
    <root>/<name>/alias_history.jsonl      one line per alias move: who, when, run, previous version

Versions are immutable and numbered 1, 2, 3, ... A registration copies the files into a
staging folder, hashes them, claims the next number with an exclusive create of
``claims/<N>`` (a second process that loses the race gets ``FileExistsError`` and tries
N + 1), writes ``manifest.json`` last, and renames the staging folder to ``versions/<N>``.
Readers list only ``versions/<N>`` folders that hold a ``manifest.json``, so a version is
visible only once it is complete. A crashed registration leaves a claim without a version
(the number is skipped, never reused) and perhaps a staging folder; neither is visible.

Example::

    reg = Registry("/tmp/registry")
    reg.register("tiny-sft", "ckpt/step-40", {"metrics": {"eval_loss": 2.1}})  # -> version 1
    reg.get("tiny-sft").version                                               # -> 1 ("latest")
    reg.promote_if_better("tiny-sft", 1, metric="eval_loss", min_delta=0.0, mode="min")
    # -> {"promoted": True, "reason": "no current champion", ...}; reg.get("tiny-sft", "champion") is v1

Command line::

    python -m steps.registry --root ROOT list [NAME]
    python -m steps.registry --root ROOT show NAME VERSION_OR_ALIAS
    python -m steps.registry --root ROOT pull NAME VERSION_OR_ALIAS DEST
    python -m steps.registry --root ROOT promote NAME VERSION [--alias champion]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_COPY_CHUNK_BYTES = 8 * 1024 * 1024
# Files the registry writes itself inside a version folder; a source folder that already
# has them (for example a pulled version being registered again) does not copy them.
_REGISTRY_FILE_NAMES = frozenset({"manifest.json", "promotion.json"})
# Manifest keys metrics tables show first, when present.
_PREFERRED_METRICS = ("eval_loss", "perplexity", "token_accuracy")


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

    ``uri`` is where the files live (a local folder path for now); ``manifest`` is the
    parsed ``manifest.json`` (lineage, metrics, ``files`` with checksums).
    """

    name: str
    version: int
    uri: str
    manifest: dict[str, Any] = dataclasses.field(compare=False, repr=False)

    @property
    def path(self) -> Path:
        """The version folder as a ``Path`` (local backend only)."""
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


def _utc_now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _default_user() -> str:
    return os.environ.get("METAFLOW_USER") or os.environ.get("USER") or "unknown"


class Registry:
    """A versioned model registry rooted at a local folder.

    Storage seam: every byte the registry reads or writes goes through the small private
    methods ``_read_bytes``, ``_write_bytes_atomic``, ``_create_exclusive``, ``_exists``,
    ``_list_dir``, ``_rename``, ``_append_line``, ``_copy_file_hashed`` and ``_alias_lock``. An S3 backend
    replaces them: ``_create_exclusive`` becomes a conditional put with
    ``If-None-Match: "*"`` (the same claim semantics as ``O_CREAT | O_EXCL``);
    ``_write_bytes_atomic`` a plain put (objects are replaced whole); ``_rename`` of the
    staging prefix becomes "upload the files under ``versions/<N>/``, then put
    ``manifest.json`` last", which keeps the rule that a version is visible only when its
    manifest exists; ``_append_line`` and ``_alias_lock`` become a read-modify-write guarded
    by ``If-Match`` on the ETag.
    """

    def __init__(self, root: str | Path):
        from steps.storage import require_local

        # Fails clearly on s3:// until the S3 backend replaces the private methods below.
        self.root = require_local(str(root), "the model registry")

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

        staging_dir = self.root / name / ".staging" / uuid.uuid4().hex
        try:
            files = {}
            for relpath, source in sources.items():
                sha256, num_bytes = self._copy_file_hashed(source, staging_dir / relpath)
                files[relpath] = {"sha256": sha256, "bytes": num_bytes}
            version = self._claim_next_version(name)
            manifest.update(files=files, created_at=_utc_now_iso(), name=name, version=version)
            # The manifest is written last: it is what makes a version count as complete.
            self._write_bytes_atomic(staging_dir / "manifest.json", _dump_json(manifest))
            self._rename(staging_dir, self._version_dir(name, version))
        except BaseException:
            # Best effort: a killed process leaves its staging folder, which nothing reads.
            shutil.rmtree(staging_dir, ignore_errors=True)
            raise
        return ModelVersion(name, version, str(self._version_dir(name, version)), manifest)

    def get(self, name: str, version_or_alias: int | str = "latest") -> ModelVersion:
        """Return one complete version: ``"latest"``, a number (int or digits) or an alias.

        Raises ``NotFoundError`` when the model, the version or the alias is missing.
        """
        version = self._resolve(name, version_or_alias)
        manifest = self._read_manifest(name, version)
        if manifest is None:
            raise NotFoundError(f"model {name!r} has no complete version {version}")
        return ModelVersion(name, version, str(self._version_dir(name, version)), manifest)

    def list(self, name: str) -> list[ModelVersion]:
        """All complete versions of ``name``, oldest first (empty if there are none)."""
        validate_name(name)
        return [self.get(name, version) for version in self._complete_versions(name)]

    def list_models(self) -> list[str]:
        """Sorted names of the models with at least one complete version."""
        names = []
        for entry in self._list_dir(self.root):
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
        """Point ``alias`` at ``version`` and append the move to the alias history.

        ``who`` defaults to ``$METAFLOW_USER``, then ``$USER``. Returns the history entry:
        ``{"alias", "version", "previous_version", "who", "when", "run", "reason"}``.
        """
        validate_alias(alias)
        version = self.get(name, _as_version_number(version)).version
        with self._alias_lock(name):
            return self._set_alias_locked(name, alias, version, who=who, run=run, reason=reason)

    def aliases(self, name: str) -> dict[str, int]:
        """``{alias: version}`` for every alias of ``name``."""
        validate_name(name)
        result = {}
        for entry in sorted(self._list_dir(self.root / name / "aliases")):
            if entry.endswith(".json"):
                pointer = json.loads(self._read_bytes(self.root / name / "aliases" / entry))
                result[entry.removesuffix(".json")] = int(pointer["version"])
        return result

    def alias_history(self, name: str) -> list[dict[str, Any]]:
        """Every alias move of ``name``, oldest first."""
        validate_name(name)
        path = self.root / name / "alias_history.jsonl"
        try:
            text = self._read_bytes(path).decode("utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def verify(self, name: str, version_or_alias: int | str = "latest") -> ModelVersion:
        """Re-hash every file of a version in place; raise ``ChecksumMismatch`` on the first bad one."""
        model_version = self.get(name, version_or_alias)
        for relpath, expected in sorted(model_version.manifest["files"].items()):
            sha256, num_bytes = _hash_file(model_version.path / relpath)
            _check_file(relpath, expected, sha256, num_bytes)
        return model_version

    def download(self, name: str, version_or_alias: int | str, dest: str | Path) -> Path:
        """Copy a version's files and ``manifest.json`` into ``dest``, verifying every sha256.

        The hash is taken of the bytes as they are copied, so what lands in ``dest`` is what
        was checked. On a mismatch the bad copy is removed and ``ChecksumMismatch`` names
        the file. Returns ``dest``.
        """
        model_version = self.get(name, version_or_alias)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for relpath, expected in sorted(model_version.manifest["files"].items()):
            target = dest / relpath
            sha256, num_bytes = self._copy_file_hashed(model_version.path / relpath, target)
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
        ``manifest["metrics"][metric]`` of both. With no current holder the candidate is
        promoted. A champion without the metric is not replaced (the numbers are not
        comparable; use ``set_alias`` to override by hand). The decision is returned and also
        written to ``versions/<N>/promotion.json`` (outside the checksummed files).

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

        # The lock makes read-decide-move one step, so two concurrent gates cannot both
        # compare against the same old champion and overwrite each other.
        with self._alias_lock(name):
            champion_version = self.aliases(name).get(alias)
            champion_value = None
            if champion_version is not None:
                champion_value = _metric_of(self.get(name, champion_version), metric)
            promoted, reason = _gate_decision(
                candidate.version, candidate_value, champion_version, champion_value,
                min_delta=min_delta, mode=mode, alias=alias, metric=metric,
            )
            decision = {
                "promoted": promoted,
                "alias": alias,
                "metric": metric,
                "mode": mode,
                "version": candidate.version,
                "candidate_value": candidate_value,
                "champion_version": champion_version,
                "champion_value": champion_value,
                "min_delta": min_delta,
                "reason": reason,
                "decided_at": _utc_now_iso(),
            }
            if promoted:
                self._set_alias_locked(name, alias, candidate.version, who=None, run=run, reason=reason)
            self._write_bytes_atomic(candidate.path / "promotion.json", _dump_json(decision))
        return decision

    # ------------------------------------------------------------------ internals

    def _version_dir(self, name: str, version: int) -> Path:
        return self.root / name / "versions" / str(version)

    def _read_manifest(self, name: str, version: int) -> dict[str, Any] | None:
        try:
            return json.loads(self._read_bytes(self._version_dir(name, version) / "manifest.json"))
        except FileNotFoundError:
            return None

    def _complete_versions(self, name: str) -> list[int]:
        """Numbers of the versions that have a manifest, ascending."""
        versions = []
        for entry in self._list_dir(self.root / name / "versions"):
            if entry.isdigit() and self._exists(self._version_dir(name, int(entry)) / "manifest.json"):
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
                raise NotFoundError(f"model {name!r} has no complete version in {str(self.root)!r}")
            return versions[-1]
        alias = validate_alias(version_or_alias)
        try:
            pointer = json.loads(self._read_bytes(self.root / name / "aliases" / f"{alias}.json"))
        except FileNotFoundError:
            raise NotFoundError(f"model {name!r} has no alias {alias!r}") from None
        return int(pointer["version"])

    def _claim_next_version(self, name: str) -> int:
        """Claim the lowest unused number above every claim and version, exclusively."""
        claims_dir = self.root / name / "claims"
        claims_dir.mkdir(parents=True, exist_ok=True)
        taken = [
            int(entry)
            for folder in (claims_dir, self.root / name / "versions")
            for entry in self._list_dir(folder)
            if entry.isdigit()
        ]
        version = max(taken, default=0) + 1
        claim = _dump_json({"who": _default_user(), "pid": os.getpid(), "claimed_at": _utc_now_iso()})
        # A number is ours once the claim file is; a version folder without a claim (copied in
        # by hand) still blocks its number.
        while not self._create_exclusive(claims_dir / str(version), claim) or self._exists(
            self._version_dir(name, version)
        ):
            version += 1
        return version

    def _set_alias_locked(
        self, name: str, alias: str, version: int, *, who: str | None, run: str | None, reason: str | None
    ) -> dict[str, Any]:
        entry = {
            "alias": alias,
            "version": version,
            "previous_version": self.aliases(name).get(alias),
            "who": who or _default_user(),
            "when": _utc_now_iso(),
            "run": run,
            "reason": reason,
        }
        self._write_bytes_atomic(self.root / name / "aliases" / f"{alias}.json", _dump_json(entry))
        self._append_line(self.root / name / "alias_history.jsonl", json.dumps(entry, sort_keys=True))
        return entry

    # ------------------------------------------------------------------ storage backend (local folder)

    def _read_bytes(self, path: Path) -> bytes:
        return path.read_bytes()

    def _write_bytes_atomic(self, path: Path, data: bytes) -> None:
        """Write to a unique temp file beside ``path``, fsync, then ``os.replace`` over it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(temp_path, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)

    def _create_exclusive(self, path: Path, data: bytes) -> bool:
        """Create ``path`` holding ``data`` only if it does not exist; ``False`` if it does."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True

    def _exists(self, path: Path) -> bool:
        return path.exists()

    def _list_dir(self, path: Path) -> list[str]:
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []

    def _rename(self, source: Path, target: Path) -> None:
        """Atomically move a complete staging folder to its final place (same filesystem)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, target)
        # Make the rename itself durable, not just the files it moved.
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _append_line(self, path: Path, line: str) -> None:
        # One write() of a short line on an O_APPEND file lands whole, never interleaved.
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def _copy_file_hashed(self, source: Path, target: Path) -> tuple[str, int]:
        """Copy ``source`` to ``target`` (fsynced); return sha256 and size of the bytes copied."""
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        num_bytes = 0
        with open(source, "rb") as reader, open(target, "wb") as writer:
            while chunk := reader.read(_COPY_CHUNK_BYTES):
                digest.update(chunk)
                writer.write(chunk)
                num_bytes += len(chunk)
            writer.flush()
            os.fsync(writer.fileno())
        return digest.hexdigest(), num_bytes

    @contextlib.contextmanager
    def _alias_lock(self, name: str) -> Iterator[None]:
        """Serialise alias changes of one model across processes (an advisory ``flock``)."""
        lock_path = self.root / name / ".alias.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------- small pure helpers


def _dump_json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _as_version_number(version: int | str) -> int:
    is_number = isinstance(version, int) or (isinstance(version, str) and version.isdigit())
    if isinstance(version, bool) or not is_number:
        raise ValueError(f"version must be a number, got {version!r}")
    return int(version)


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    num_bytes = 0
    with open(path, "rb") as reader:
        while chunk := reader.read(_COPY_CHUNK_BYTES):
            digest.update(chunk)
            num_bytes += len(chunk)
    return digest.hexdigest(), num_bytes


def _check_file(relpath: str, expected: dict[str, Any], sha256: str, num_bytes: int) -> None:
    if sha256 != expected["sha256"] or num_bytes != expected["bytes"]:
        raise ChecksumMismatch(relpath, expected["sha256"], sha256)


def _metric_of(model_version: ModelVersion, metric: str) -> float | None:
    value = (model_version.manifest.get("metrics") or {}).get(metric)
    return None if value is None else float(value)


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
) -> tuple[bool, str]:
    """Return ``(promoted, reason)``; see ``Registry.promote_if_better``."""
    if math.isnan(candidate_value):
        return False, f"candidate {metric} is NaN"
    if champion_version is None:
        return True, f"no current {alias}"
    if champion_version == candidate_version:
        return False, f"version {candidate_version} already is {alias}"
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
    ordered = [key for key in _PREFERRED_METRICS if key in metrics]
    ordered += sorted(key for key in metrics if key not in _PREFERRED_METRICS)
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
    promotion_path = v.path / "promotion.json"
    if registry._exists(promotion_path):
        decision = json.loads(registry._read_bytes(promotion_path))
        sections.append(f"last gate decision: promoted={decision['promoted']} ({decision['reason']})")
    file_rows = [[relpath, str(entry["bytes"]), entry["sha256"]] for relpath, entry in sorted(files.items())]
    sections.append(_format_table(["file", "bytes", "sha256"], file_rows))
    return "\n\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m steps.registry", description="Inspect and manage the model registry."
    )
    parser.add_argument("--root", required=True, help="registry root folder")
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
