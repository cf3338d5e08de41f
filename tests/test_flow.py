"""The SFT flow end to end with metaflow.Runner on a small recipe, and its code package."""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT

FLOW = PROJECT_ROOT / "flows" / "sft_flow.py"


def small_recipe(tmp_path: Path, **overrides) -> Path:
    """A recipe that runs the whole flow in about a minute on 2 cores."""
    recipe = {
        "name": "sft-ci", "seed": 0, "storage": str(tmp_path / "storage"),
        "data": {"builtin_num_conversations": 800, "eval_fraction": 0.1},
        "train": {"micro_batch_tokens": 2048, "global_batch_tokens": 2048, "max_steps": 24,
                  "warmup_steps": 2, "lr": 3e-3, "save_every_steps": 12, "log_every_steps": 4},
        "evaluate": {"num_task_prompts": 16, "max_new_tokens": 24, "generation_batch_size": 16},
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def tiny_recipe(root: Path, **overrides) -> Path:
    """``small_recipe`` cut to 12 steps (checkpoints at 6 and 12) on 400 conversations: for tests
    of the plumbing around training, where the model only has to exist.

    ``overrides`` are merged into the sections: ``tiny_recipe(root, train={"fail_at_step": 9})``.
    """
    sections = {"data": {"builtin_num_conversations": 400, "eval_fraction": 0.1},
                "train": {"micro_batch_tokens": 2048, "global_batch_tokens": 2048, "max_steps": 12,
                          "warmup_steps": 2, "lr": 3e-3, "save_every_steps": 6, "log_every_steps": 2},
                "evaluate": {"num_task_prompts": 8, "max_new_tokens": 16, "generation_batch_size": 8}}
    for key, value in overrides.items():
        sections[key] = {**sections[key], **value} if isinstance(value, dict) and key in sections else value
    return small_recipe(root, **sections)


def run_flow(recipe_path: Path | None, sysroot: Path, env: dict | None = None, *, flow: Path = FLOW,
             **run_kwargs):
    """Run SFTFlow (or the flow file ``flow``) with ``recipe_path`` (None: the default recipe)
    through metaflow.Runner.

    It runs from ``sysroot``, the folder that holds the datastore: a local run writes its cards
    under ``<cwd>/.metaflow/mf.cards`` (the nearest ``.metaflow`` folder) and the card client
    reads ``<datastore>/mf.cards``, so this makes them one place, as ``python flows/sft_flow.py
    run`` from the repository root does with the default ``./.metaflow``.
    """
    from metaflow import Runner

    env = {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(sysroot), "METAFLOW_USER": "posttrain-tests",
           "HF_HUB_OFFLINE": "1", **(env or {})}
    config = {"config": [("recipe", str(recipe_path))]} if recipe_path else {}
    (Path(sysroot) / ".metaflow").mkdir(parents=True, exist_ok=True)
    with Runner(str(flow), show_output=False, env=env, cwd=str(sysroot), **config) as runner:
        result = runner.run(**run_kwargs)
        assert result.status == "successful", result.stdout[-4000:] + result.stderr[-8000:]
        return result.run


def assert_loads_and_generates(model_dir: Path) -> None:
    """A registered model folder loads with plain transformers and generates new tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Recommend a comedy."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.slow
def test_sft_flow_end_to_end_registers_versions_1_then_2(tmp_path, metaflow_env, default_run):
    """The default run registered v1 with all its artifacts; a second (tiny) run on a copy of
    that registry takes v2 and leaves v1 as it was."""
    run = default_run.client_run()
    register = run["register"].task.data
    assert register.model_name == "catalog-assistant" and register.model_version == 1
    model_uri = Path(register.model_uri)
    assert model_uri == default_run.storage / "registry" / "catalog-assistant" / "versions" / "1"
    assert (model_uri / "manifest.json").exists() and (model_uri / "model.safetensors").exists()

    end = run["end"].task.data
    assert end.dataset_manifest["num_valid"] > 0 and end.dataset_manifest["fingerprint"]
    assert end.token_stats["train"]["num_rows"] > 0
    checkpoints = ["step-000100", "step-000200", "step-000300", "step-000400"]
    assert [Path(c).name for c in end.checkpoints] == checkpoints
    assert [row["step"] for row in end.train_curve][-1] == 400
    assert {row["checkpoint"] for row in end.eval_metrics} == {"base", *checkpoints}
    assert end.best_checkpoint["checkpoint"] in checkpoints
    assert end.lineage["recipe"]["name"] == "sft-tiny"

    assert_loads_and_generates(model_uri)


@pytest.mark.slow
def test_second_run_registers_v2_to_an_s3_registry_and_the_gate_keeps_v1(tmp_path, metaflow_env, s3_bucket,
                                                                       default_run):
    """A second (tiny) run with `register.registry_root: s3://...`, on a copy of the default run's
    registry: it uploads v2, leaves v1 as it was, and v2 pulls back checksum-verified and loads.
    The gate keeps v1 as champion: v2 was scored on another eval set."""
    import os

    from metaflow import namespace

    from steps import storage
    from steps.registry import Registry

    registry_root = f"s3://{s3_bucket}/registry"
    local_registry = default_run.storage / "registry"
    for file in sorted(p for p in local_registry.rglob("*") if p.is_file()):
        storage.upload_file(file, storage.join(registry_root, *file.relative_to(local_registry).parts))
    v1_manifest = storage.read_bytes(f"{registry_root}/catalog-assistant/versions/1/manifest.json")
    assert Registry(registry_root).get("catalog-assistant", "champion").version == 1

    recipe = tiny_recipe(tmp_path, register={"registry_root": registry_root})
    s3_env = {key: os.environ[key] for key in (
        "METAFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    run = run_flow(recipe, metaflow_env, env=s3_env)
    namespace(None)
    data = run["end"].task.data
    assert (data.model_name, data.model_version) == ("catalog-assistant", 2)
    assert data.model_uri == f"{registry_root}/catalog-assistant/versions/2"
    assert storage.read_bytes(f"{registry_root}/catalog-assistant/versions/1/manifest.json") == v1_manifest
    assert data.promotion["promoted"] is False and "eval set" in data.promotion["reason"]

    registry = Registry(registry_root)
    assert registry.get("catalog-assistant", "champion").version == 1
    version = registry.get("catalog-assistant", 2)
    assert registry.promotion("catalog-assistant", 2) == data.promotion
    assert version.manifest["run"] == run.pathspec
    eval_split = data.dataset_manifest["splits"]["eval"]
    assert version.manifest["eval_set"]["fingerprint"] == eval_split["fingerprint"]
    best = data.best_checkpoint
    assert version.manifest["metrics"]["assistant_token_accuracy"] == best["assistant_token_accuracy"]
    assert version.manifest["lineage"]["git_sha"] and version.manifest["lineage"]["packages"]["torch"]
    stored = {uri.removeprefix(data.model_uri + "/") for uri in storage.list_files(data.model_uri)}
    assert {"manifest.json", "promotion.json", "model.safetensors", "config.json"} <= stored
    assert stored - {"manifest.json", "promotion.json"} == set(version.manifest["files"])

    pulled = registry.download("catalog-assistant", 2, tmp_path / "pulled")
    assert_loads_and_generates(pulled)


def test_code_package_carries_steps(tmp_path, metaflow_env):
    out = tmp_path / "package.tgz"
    result = subprocess.run([sys.executable, str(FLOW), "package", "save", str(out)], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    with tarfile.open(out) as tar:
        names = tar.getnames()
    for module in ("steps/__init__.py", "steps/train.py", "steps/config.py", "steps/builtin/catalog.py"):
        assert any(n.endswith(module) for n in names), f"{module} missing from the code package: {names}"


@pytest.mark.slow
def test_default_recipe_learns_the_catalog_task(default_run):
    """The embedded default, as `python flows/sft_flow.py run` runs it: the registered model's
    task score is at least 0.5, and at least 0.4 above the untrained base model's."""
    data = default_run.client_run()["end"].task.data
    base = next(row for row in data.eval_metrics if row["checkpoint"] == "base")
    best = data.best_checkpoint
    print({"base": base["task_score"], "best": best["task_score"], "checkpoint": best["checkpoint"]})
    assert best["task_score"] >= 0.5
    assert best["task_score"] - base["task_score"] >= 0.4
    assert data.model_version == 1 and Path(data.model_uri).is_relative_to(default_run.storage)
    assert data.token_stats["train"]["num_rows"] > 2000
