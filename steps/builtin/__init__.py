"""The embedded defaults: a tiny model built offline, the catalog dataset and its scorer.

Recipes refer to these as ``builtin:<name>``; callers strip the prefix and ask here.

Example:
    >>> sorted(BUILTIN_MODELS), sorted(BUILTIN_DATASETS), sorted(BUILTIN_EVALUATORS)
    (['tiny-llama', 'tiny-llama-student'], ['catalog', 'catalog-pairs'], ['catalog'])
    >>> record = next(builtin_dataset("catalog", num_conversations=1, seed=0))
    >>> builtin_evaluator("catalog")([record], [record["messages"][-1]["content"]])["num_recommend"] >= 0
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from steps.builtin.catalog import CATALOG_EVALUATOR, generate_conversations, generate_preference_pairs
from steps.builtin.tiny_llama import build_tiny_llama, build_tiny_llama_student

Evaluator = Callable[[Sequence[Mapping[str, Any]], Sequence[str]], dict[str, float]]
"""``(records, answers) -> metrics``; records carry ``messages`` and ``meta``."""

BUILTIN_MODELS: dict[str, Callable[..., Path]] = {"tiny-llama": build_tiny_llama,
                                                   "tiny-llama-student": build_tiny_llama_student}
"""Model name -> builder ``(dest: Path, *, seed: int) -> Path``."""
BUILTIN_DATASETS: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {"catalog": generate_conversations,
                                                                        "catalog-pairs": generate_preference_pairs}
BUILTIN_EVALUATORS: dict[str, Evaluator] = {"catalog": CATALOG_EVALUATOR}

# Part of the cache folder name; bump with the builders' BUILD_VERSION so a new
# build never reuses an old folder.
_BUILD_SUFFIX = "v1"


def _lookup(kind: str, table: Mapping[str, Any], name: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown builtin {kind} {name!r}; known: {', '.join(sorted(table))}") from None


def ensure_builtin_model(name: str, cache_root: Path) -> Path:
    """Build the named model into ``cache_root/builtin/<name>-v1`` once; return the folder.

    Later calls (and other processes) reuse the complete folder without rebuilding.
    """
    builder = _lookup("model", BUILTIN_MODELS, name)
    return builder(Path(cache_root) / "builtin" / f"{name}-{_BUILD_SUFFIX}")


def builtin_dataset(name: str, num_conversations: int, seed: int) -> Iterator[dict[str, Any]]:
    """Records of a builtin dataset: conversations ``{"messages", "meta"}`` (``catalog``) or
    preference pairs ``{"prompt", "chosen", "rejected", "meta"}`` (``catalog-pairs``)."""
    generator = _lookup("dataset", BUILTIN_DATASETS, name)
    return generator(num_conversations, seed=seed)


def builtin_evaluator(name: str) -> Evaluator:
    """The task scorer of a builtin dataset, e.g. ``builtin_evaluator("catalog")``."""
    return _lookup("evaluator", BUILTIN_EVALUATORS, name)


__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_EVALUATORS",
    "BUILTIN_MODELS",
    "Evaluator",
    "builtin_dataset",
    "builtin_evaluator",
    "ensure_builtin_model",
]
