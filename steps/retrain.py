"""The scheduled retrain: which data is new, what to warm-start from, which eval set to keep.

New data arrives as files ("drops") under ``retrain.drops`` (a folder or ``s3://`` prefix),
for example one JSONL file per day: every file at any depth whose name ends in ``.jsonl``,
``.jsonl.gz`` or ``.parquet`` is one drop, known by its full path. A retrain consumes every
drop that the last successful retrain of the same project branch had not consumed; the flow
reads that watermark (its ``consumed_drops``) back through the Metaflow Client and passes it
here, so this module stays metaflow-free. ``python -m steps.retrain drop FILE...`` copies or uploads
files into ``retrain.drops`` under names that sort by time. How to feed it: docs/production.md::

    >>> new_drops(["d/2024-01-01.jsonl", "d/2024-01-02.jsonl"], consumed=["d/2024-01-01.jsonl"])
    ['d/2024-01-02.jsonl']

Warm start: the model trained is the registry's current champion (downloaded), or the
recipe's base model when there is no champion yet. The eval set is the champion's, so the
gate compares the candidate with the champion on the same conversations.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from steps import storage
from steps.config import Recipe, SourceConfig

DROP_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


class NoNewData(RuntimeError):
    """Nothing arrived since the last successful retrain (and ``retrain.force`` is off)."""


def list_drops(drops_uri: str) -> list[str]:
    """Every data file under ``drops_uri`` (JSONL, JSONL.gz, Parquet), sorted by URI."""
    return _drop_files(_folder_state(drops_uri)[1])


def _drop_files(files: Iterable[str]) -> list[str]:
    return sorted(uri for uri in files if uri.endswith(DROP_SUFFIXES))


def new_drops(available: Iterable[str], consumed: Iterable[str]) -> list[str]:
    """The drops in ``available`` that are not in ``consumed``, sorted."""
    seen = set(consumed)
    return sorted(uri for uri in available if uri not in seen)


def select_drops(recipe: Recipe, consumed: list[str], last_run: str | None) -> list[str]:
    """The drops this run trains on: the new ones, or all of them when ``retrain.force`` is set.

    Raises:
        NoNewData: when nothing is new and ``retrain.force`` is off, or there is no drop at all.
            The message tells apart a folder that does not exist, one that holds no drop file,
            and drops that were all consumed by earlier runs (``no_new_data_message``).
    """
    r = recipe.retrain
    found, files = _folder_state(r.drops)
    available = _drop_files(files)
    fresh = new_drops(available, consumed)
    if fresh:
        return fresh
    if r.force and available:
        return available
    raise NoNewData(no_new_data_message(r.drops, found, files, last_run))


HELP_PAGE = "docs/production.md, 'Feeding the retrain flow'"


def no_new_data_message(drops_uri: str, found: bool, files: list[str], last_run: str | None) -> str:
    """Why a retrain has nothing to train on, and what to do about it.

    ``found`` says whether the drops folder exists and ``files`` lists everything under it; a
    drop among them was consumed by ``last_run`` (a run pathspec) or the runs before it::

        >>> drops = "/data/drops"
        >>> print(no_new_data_message(drops, True, [f"{drops}/2026-01-01.jsonl"], "RetrainFlow/7"))
        ... # doctest: +NORMALIZE_WHITESPACE
        no new data under retrain.drops='/data/drops': 1 drop(s) there, all consumed by
        RetrainFlow/7 (newest: 2026-01-01.jsonl). Add a new drop there, or set retrain.force: true
        to retrain on all of them anyway; see docs/production.md, 'Feeding the retrain flow'.
        >>> print(no_new_data_message(drops, True, [f"{drops}/notes.txt"], None))
        ... # doctest: +NORMALIZE_WHITESPACE +ELLIPSIS
        no new data under retrain.drops='/data/drops': the folder holds no drop file, only 1 other
        file(s): notes.txt. A drop is a .jsonl, .jsonl.gz or .parquet file (or a folder of them) ...
    """
    head = f"no new data under retrain.drops={drops_uri!r}"
    available = _drop_files(files)
    if available:
        return (f"{head}: {len(available)} drop(s) there, all consumed by {last_run or 'earlier runs'} "
                f"(newest: {_relative(drops_uri, available[-1])}). Add a new drop there, or set "
                f"retrain.force: true to retrain on all of them anyway; see {HELP_PAGE}.")
    example = storage.join(drops_uri, f"{datetime.now(timezone.utc):%Y-%m-%dT%H%M}-events.jsonl")
    how = (f"A drop is a {', '.join(DROP_SUFFIXES[:-1])} or {DROP_SUFFIXES[-1]} file (or a folder of them) "
           f"put under that folder, named to sort by time, e.g. {example}; see {HELP_PAGE}.")
    if not found:
        where = "that prefix" if storage.is_s3(drops_uri) else f"that folder ({Path(drops_uri).resolve()})"
        return f"{head}: {where} does not exist. Create it and put a drop in it. {how}"
    if not files:
        return f"{head}: the folder is empty. {how}"
    shown = ", ".join(_relative(drops_uri, uri) for uri in files[:5])
    more = f" and {len(files) - 5} more" if len(files) > 5 else ""
    return f"{head}: the folder holds no drop file, only {len(files)} other file(s): {shown}{more}. {how}"


def _folder_state(drops_uri: str) -> tuple[bool, list[str]]:
    """Whether the drops folder exists, and every file under it, of any type, sorted.

    S3 has no folders: a prefix exists when its bucket does and an object lies under it.
    """
    if not storage.is_s3(drops_uri):
        return Path(drops_uri).exists(), storage.list_files(drops_uri)
    from botocore.exceptions import ClientError

    try:
        files = storage.list_files(drops_uri)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") == "NoSuchBucket":
            return False, []
        raise
    return bool(files), files


def _relative(root: str, uri: str) -> str:
    """``uri`` relative to the drops folder ``root``, e.g. ``2026-01/a.jsonl``."""
    if storage.is_s3(root):
        prefix = root.rstrip("/") + "/"
        return uri[len(prefix):] if uri.startswith(prefix) else uri
    try:
        return str(Path(uri).relative_to(Path(root)))
    except ValueError:
        return uri


def with_sources(recipe: Recipe, uris: list[str]) -> Recipe:
    """``recipe`` with ``data.sources`` replaced by ``uris`` (weight 1 each)."""
    data = dataclasses.replace(recipe.data, sources=[SourceConfig(uri=uri) for uri in uris])
    return dataclasses.replace(recipe, data=data)


def warm_start(recipe: Recipe, dest: str | Path) -> tuple[str, dict | None]:
    """The model to start from: the champion (downloaded to ``dest``), or the recipe's base model
    while ``register.model_name`` has no version at all (the first retrain).

    Returns ``(model_path, champion)`` where ``champion`` is ``{"version", "run", "metrics"}``
    from the registry manifest, or None when there is no version yet. Versions without the
    ``promote.alias`` alias are an error (``steps.models.ModelNotFound``), not a silent start from
    scratch: point the alias at one (``python -m steps.registry promote``).
    """
    from steps.models import REGISTRY_PREFIX, resolve_model_ref

    ref = f"{REGISTRY_PREFIX}{recipe.register.model_name}@{recipe.promote.alias}"
    path, champion = resolve_model_ref(ref, recipe, dest, field="the retrain's champion", fall_back_to_base=True)
    if champion is None:
        return path, None
    return path, {"version": champion["version"], "run": champion["run"], "metrics": champion["metrics"]}


def keep_eval_split(dataset_manifest: dict, eval_split: dict | None) -> dict:
    """The manifest with its eval split replaced by ``eval_split`` (the champion's), if given.

    The new drops' own hash-chosen eval conversations are then left out of training and
    evaluation alike; the candidate and the champion are scored on the same eval set.
    """
    if eval_split is None:
        return dataset_manifest
    return {**dataset_manifest, "splits": {**dataset_manifest["splits"], "eval": eval_split},
            "eval_from": "champion"}


# --------------------------------------------------------------------------------------------
# Feeding the flow: `python -m steps.retrain drop FILE... [--recipe RECIPE | --drops URI]`

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "retrain_tiny.yaml"
"""The recipe ``flows/retrain_flow.py`` runs without ``--config recipe``; ``drop`` defaults to it too."""


class DropExists(FileExistsError):
    """A drop of that name is already there; drops are never overwritten."""


def drop_name(file: str | Path, now: datetime | None = None) -> str:
    """The name a file gets in the drops folder: a UTC timestamp to the minute, then its own name,
    so that drops sort by the time they were dropped::

        >>> drop_name("exports/events.jsonl", datetime(2026, 12, 8, 9, 15, tzinfo=timezone.utc))
        '2026-12-08T0915-events.jsonl'
    """
    now = now or datetime.now(timezone.utc)
    return f"{now.astimezone(timezone.utc):%Y-%m-%dT%H%M}-{Path(file).name}"


def drop_files(files: Iterable[str | Path], drops_uri: str, now: datetime | None = None) -> list[str]:
    """Copy (or upload, for an ``s3://`` ``drops_uri``) each local file into the drops folder under
    :func:`drop_name`; return the new drops' URIs in the order given.

    Every file is checked before anything is written: it must exist and end in a drop suffix
    (otherwise the retrain would ignore it), and no drop of its new name may exist. The write
    itself never replaces a drop either: locally the file is copied under a hidden temporary name
    and hard-linked into place (which fails if the name was taken meanwhile); on S3 it is one
    conditional put (``If-None-Match: *``, at most 5 GB per file).

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file is not a ``.jsonl``, ``.jsonl.gz`` or ``.parquet`` file, or two files
            share a name.
        DropExists: a drop of that name is already there (drop again in a minute, or rename it).
    """
    now = now or datetime.now(timezone.utc)
    plan = []
    for file in map(Path, files):
        if storage.is_s3(file) or not file.is_file():
            raise FileNotFoundError(f"no such local file: {file}")
        if not file.name.endswith(DROP_SUFFIXES):
            raise ValueError(f"{file} is not a drop: the retrain reads only {', '.join(DROP_SUFFIXES)} files")
        plan.append((file, storage.join(drops_uri, drop_name(file, now))))
    targets = [target for _, target in plan]
    if len(set(targets)) != len(targets):
        raise ValueError(f"two files would get the same drop name: {sorted(targets)}")
    for target in targets:
        if storage.exists(target):
            raise DropExists(f"{target} already exists; drops are never overwritten (drop again in a minute, "
                             "or rename the file)")
    for file, target in plan:
        _put_new(file, target)
    return targets


def _put_new(file: Path, target: str) -> None:
    """Write ``file`` as ``target`` only if ``target`` does not exist; it appears whole or not at all."""
    if storage.is_s3(target):
        from botocore.exceptions import ClientError

        bucket, key = storage.split_s3(target)
        try:
            with open(file, "rb") as body:
                storage.s3_client().put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise DropExists(f"{target} already exists; drops are never overwritten") from None
            raise
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden name without a drop suffix: a retrain listing the folder meanwhile ignores it.
    partial = path.with_name(f".{path.name}.partial")
    shutil.copyfile(file, partial)
    try:
        os.link(partial, path)  # atomic, and fails if the name exists
    except FileExistsError:
        raise DropExists(f"{target} already exists; drops are never overwritten") from None
    finally:
        partial.unlink()


def next_retrain_message(drops_uri: str, added: list[str]) -> str:
    """What the next retrain picks up, after ``added`` were dropped into ``drops_uri``.

    The watermark lives in each ``@project`` branch's last successful run (read through the
    Metaflow Client by the flow, not here), so this names the new drops, which every branch has
    yet to consume, and counts the drops there in all.
    """
    available = list_drops(drops_uri)
    lines = [f"dropped {len(added)} file(s) into {drops_uri}:"]
    lines += [f"  {_relative(drops_uri, uri)}" for uri in added]
    lines.append(f"The next retrain (`python flows/retrain_flow.py run`, or the next scheduled run of a "
                 f"deployed branch) trains on {'these' if len(added) > 1 else 'this'}, plus any other drop its "
                 f"branch has not consumed yet; {len(available)} drop(s) are there in all, newest "
                 f"{_relative(drops_uri, available[-1]) if available else '-'}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from steps.config import load_recipe

    parser = argparse.ArgumentParser(prog="python -m steps.retrain", description="Feed the scheduled retrain.")
    commands = parser.add_subparsers(dest="command", required=True)
    drop_parser = commands.add_parser(
        "drop", help="copy or upload data files into retrain.drops under names that sort by time")
    drop_parser.add_argument("files", nargs="+", metavar="FILE", help="local .jsonl, .jsonl.gz or .parquet files")
    where = drop_parser.add_mutually_exclusive_group()
    where.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE,
                       help="the retrain recipe whose retrain.drops receives the files (default: %(default)s)")
    where.add_argument("--drops", help="the drops folder or s3:// prefix itself")
    args = parser.parse_args(argv)
    try:
        drops_uri = args.drops or load_recipe(args.recipe).retrain.drops
        if not drops_uri:
            raise ValueError(f"recipe {args.recipe} has no retrain.drops: pass --drops or set it")
        added = drop_files(args.files, drops_uri)
        print(next_retrain_message(drops_uri, added))
        return 0
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        if not type(error).__module__.startswith(("botocore", "boto3", "s3transfer")):
            raise
        print(f"error: {error}", file=sys.stderr)  # no such bucket, no credentials, endpoint down
        return 1


if __name__ == "__main__":
    sys.exit(main())
