"""The register step: export the best checkpoint, publish it with lineage, gate the champion."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from steps import checkpoint, storage
from steps.config import Recipe
from steps.contracts import baseline_row, reported
from steps.evaluate import paired_difference, scorers_of
from steps.registry import ModelVersion, Registry


def register_best(recipe: Recipe, best: dict, eval_metrics: list[dict], lineage: dict,
                  dataset_manifest: dict, run_root: str) -> ModelVersion:
    """Register the best checkpoint (model + tokenizer, HF format) as the next version.

    The manifest holds the lineage (run pathspec, recipe, base model, git SHA, packages), the
    dataset fingerprint, the best checkpoint's metrics and the baseline's; the registry adds
    file checksums, the version number and the creation time.
    """
    export_dir = checkpoint.export_model(Path(best["path"]), Path(run_root) / "export" / best["checkpoint"])
    baseline = baseline_row(eval_metrics)
    manifest = {
        "flow": lineage["pathspec"].split("/")[0],
        "run": lineage["pathspec"].rsplit("/", 2)[0],
        "lineage": lineage,
        "base_model": lineage["base_model"],
        "dataset_fingerprint": dataset_manifest["fingerprint"],
        "eval_set": {"num_conversations": dataset_manifest["splits"]["eval"]["num_conversations"],
                     "fingerprint": dataset_manifest["splits"]["eval"]["fingerprint"],
                     "scorers": scorers_of(recipe.evaluate.evaluators)},
        "checkpoint": best["checkpoint"],
        "metrics": _numbers(best),
        "baseline_metrics": _numbers(baseline) if baseline else None,
    }
    return Registry(recipe.registry_root).register(recipe.register.model_name, export_dir, manifest)


def promote(recipe: Recipe, version: ModelVersion, pathspec: str) -> dict:
    """Move the recipe's alias (``champion``) to ``version`` only if it beats the holder.

    The gate compares ``promote.metric`` of both manifests, and only when both were scored on
    the same eval split by the same evaluator versions (``manifest["eval_set"]``: ``fingerprint``
    and ``scorers``). The decision, with its
    numbers, is returned (the flow keeps it as ``promotion``) and written beside the version as
    ``promotion.json``; the manifest itself stays immutable.
    """
    p = recipe.promote
    return Registry(recipe.registry_root).promote_if_better(
        version.name, version.version, metric=p.metric, min_delta=p.min_delta, mode=p.mode,
        alias=p.alias, run=pathspec)


def summary(recipe: Recipe, name: str, version: int, uri: str, eval_metrics: list[dict], best: dict,
            promotion: dict, extra_metrics: Sequence[str] = ()) -> str:
    """A few lines for the end of a run: where the model is, how it compares, how to load it.

    The metrics are those of ``steps.contracts.METRICS`` the best row has, then the method's own
    ``extra_metrics`` (DPO's held-out preference metrics).
    """
    baseline = baseline_row(eval_metrics) or {}
    keys = reported(best) + [k for k in extra_metrics if k in best]
    lines = [f"Registered {name} v{version} ({best['checkpoint']}) at {uri}",
             f"{'metric':<26}{'base':>10}{'model':>10}"]
    lines += [f"{k:<26}{baseline.get(k, float('nan')):>10.4f}{best[k]:>10.4f}" for k in keys]
    if "per_request" in best and "per_request" in baseline:
        p = paired_difference(baseline["per_request"]["scores"], best["per_request"]["scores"])
        lines.append(f"{best['per_request']['metric']} vs base on the same {p['num_requests']} requests: "
                     f"{p['difference']:+.4f} +- {p['ci95']:.4f} (95%, paired); {p['better']} better, "
                     f"{p['worse']} worse")
    lines.append(f"{recipe.promote.alias}: {'promoted' if promotion.get('promoted') else 'unchanged'}"
                 f" ({promotion.get('reason', '')})")
    pull = f"python -m steps.registry --root {recipe.registry_root} pull {name} {version} DEST"
    # transformers cannot read s3:// itself: a version on S3 is pulled (checksums verified) first.
    folder = "DEST" if storage.is_s3(uri) else uri
    if storage.is_s3(uri):
        lines.append(f"Pull it (checksums verified) with:\n  {pull}")
    lines.append("Load it with:\n"
                 "  from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                 f"  model = AutoModelForCausalLM.from_pretrained({folder!r})\n"
                 f"  tokenizer = AutoTokenizer.from_pretrained({folder!r})")
    if not storage.is_s3(uri):
        lines.append(f"or copy it, checksums verified: {pull}")
    return "\n".join(lines)


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
