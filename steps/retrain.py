"""The scheduled retrain: which data is new, what to warm-start from, which eval set to keep.

New data arrives as files ("drops") under ``retrain.drops`` (a folder or ``s3://`` prefix),
for example one JSONL file per day. A retrain consumes every drop that the last successful
retrain of the same project branch had not consumed; the flow reads that watermark back
through the Metaflow Client and passes it here, so this module stays metaflow-free::

    >>> new_drops(["d/2024-01-01.jsonl", "d/2024-01-02.jsonl"], consumed=["d/2024-01-01.jsonl"])
    ['d/2024-01-02.jsonl']

Warm start: the model trained is the registry's current champion (downloaded), or the
recipe's base model when there is no champion yet. The eval set is the champion's, so the
gate compares the candidate with the champion on the same conversations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from steps import storage
from steps.config import Recipe, SourceConfig

DROP_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


class NoNewData(RuntimeError):
    """Nothing arrived since the last successful retrain (and ``retrain.force`` is off)."""


def list_drops(drops_uri: str) -> list[str]:
    """Every data file under ``drops_uri`` (JSONL, JSONL.gz, Parquet), sorted by URI."""
    return sorted(uri for uri in storage.list_files(drops_uri) if uri.endswith(DROP_SUFFIXES))


def new_drops(available: Iterable[str], consumed: Iterable[str]) -> list[str]:
    """The drops in ``available`` that are not in ``consumed``, sorted."""
    seen = set(consumed)
    return sorted(uri for uri in available if uri not in seen)


def select_drops(recipe: Recipe, consumed: list[str], last_run: str | None) -> list[str]:
    """The drops this run trains on: the new ones, or all of them when ``retrain.force`` is set.

    Raises:
        NoNewData: with what was looked at, when nothing is new and ``retrain.force`` is off.
    """
    r = recipe.retrain
    available = list_drops(r.drops)
    fresh = new_drops(available, consumed)
    if fresh:
        return fresh
    if r.force and available:
        return available
    raise NoNewData(
        f"no new data under retrain.drops={r.drops!r}: {len(available)} drop(s) there, all consumed by "
        f"{last_run or 'earlier runs'}. Add a file there, or set retrain.force: true to retrain anyway.")


def with_sources(recipe: Recipe, uris: list[str]) -> Recipe:
    """``recipe`` with ``data.sources`` replaced by ``uris`` (weight 1 each)."""
    data = dataclasses.replace(recipe.data, sources=[SourceConfig(uri=uri) for uri in uris])
    return dataclasses.replace(recipe, data=data)


def warm_start(recipe: Recipe, dest: str | Path) -> tuple[str, dict | None]:
    """The model to start from: the champion (downloaded to ``dest``) or the recipe's base model.

    Returns ``(model_path, champion)`` where ``champion`` is ``{"version", "run", "metrics"}``
    from the registry manifest, or None when there is no champion yet.
    """
    from steps.lineage import resolve_base_model
    from steps.registry import NotFoundError, Registry

    registry = Registry(recipe.registry_root)
    try:
        champion = registry.get(recipe.register.model_name, recipe.promote.alias)
    except NotFoundError:
        return str(resolve_base_model(recipe)), None
    path = registry.download(recipe.register.model_name, champion.version, dest)
    return str(path), {"version": champion.version, "run": champion.manifest.get("run"),
                       "metrics": dict(champion.manifest.get("metrics") or {})}


def keep_eval_split(dataset_manifest: dict, eval_split: dict | None) -> dict:
    """The manifest with its eval split replaced by ``eval_split`` (the champion's), if given.

    The new drops' own hash-chosen eval conversations are then left out of training and
    evaluation alike; the candidate and the champion are scored on the same eval set.
    """
    if eval_split is None:
        return dataset_manifest
    return {**dataset_manifest, "splits": {**dataset_manifest["splits"], "eval": eval_split},
            "eval_from": "champion"}
