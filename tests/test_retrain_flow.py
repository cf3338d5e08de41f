"""The scheduled retrain: drop selection, the Argo template, and two data drops end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT
from steps import retrain
from steps.config import recipe_from_dict

FLOW = PROJECT_ROOT / "flows" / "retrain_flow.py"


def write_drop(path: Path, num_conversations: int, seed: int) -> Path:
    """One data drop: builtin catalog conversations as JSONL."""
    from steps.builtin import builtin_dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in builtin_dataset("catalog", num_conversations=num_conversations, seed=seed):
            f.write(json.dumps(record) + "\n")
    return path


def test_select_drops_takes_only_new_files_and_fails_clearly_without_any(tmp_path):
    drops = tmp_path / "drops"
    drops.mkdir()
    (drops / "a.jsonl").write_text("{}\n")
    (drops / "b.parquet").write_bytes(b"")
    (drops / "notes.txt").write_text("not data")
    recipe = recipe_from_dict({"retrain": {"drops": str(drops)}})
    assert retrain.select_drops(recipe, [], None) == [str(drops / "a.jsonl"), str(drops / "b.parquet")]
    assert retrain.select_drops(recipe, [str(drops / "a.jsonl")], None) == [str(drops / "b.parquet")]
    consumed = [str(drops / "a.jsonl"), str(drops / "b.parquet")]
    with pytest.raises(retrain.NoNewData, match=r"no new data under retrain.drops=.*2 drop\(s\) there, all "
                                                 r"consumed by RetrainFlow/7.*retrain.force: true"):
        retrain.select_drops(recipe, consumed, "RetrainFlow/7")
    forced = recipe_from_dict({"retrain": {"drops": str(drops), "force": True}})
    assert retrain.select_drops(forced, consumed, None) == consumed


def test_keep_eval_split_replaces_only_eval():
    manifest = {"fingerprint": "f", "splits": {"train": {"uris": ["t"]}, "eval": {"uris": ["new-eval"]}}}
    kept = retrain.keep_eval_split(manifest, {"uris": ["champion-eval"]})
    assert kept["splits"] == {"train": {"uris": ["t"]}, "eval": {"uris": ["champion-eval"]}}
    assert kept["eval_from"] == "champion" and retrain.keep_eval_split(manifest, None) is manifest


def test_argo_workflow_template_has_the_schedule_and_the_parallel_jobset(s3_bucket, tmp_path):
    """`argo-workflows create --only-json` renders the template without a cluster.

    It still needs: the `kubernetes` Python package (imported by the Kubernetes decorator), an S3
    datastore (the code package is uploaded during create; here the local moto server), and a
    metadata service URL (written into the pods' environment, never contacted here).
    """
    env = {**os.environ, "METAFLOW_DEFAULT_DATASTORE": "s3",
           "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{s3_bucket}/metaflow",
           "METAFLOW_DEFAULT_METADATA": "service", "METAFLOW_SERVICE_URL": "http://127.0.0.1:9/api",
           "METAFLOW_KUBERNETES_NAMESPACE": "posttrain", "METAFLOW_KUBERNETES_SERVICE_ACCOUNT": "posttrain",
           "METAFLOW_KUBERNETES_CONTAINER_IMAGE": "posttrain:test", "METAFLOW_USER": "ci",
           "METAFLOW_HOME": str(tmp_path)}  # no ~/.metaflowconfig of the machine
    result = subprocess.run([sys.executable, str(FLOW), "--branch", "nightly", "argo-workflows", "create",
                             "--only-json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    template = json.loads(result.stdout[result.stdout.index("{"):])
    assert template["kind"] == "WorkflowTemplate"
    annotations = template["metadata"]["annotations"]
    assert json.loads(annotations["metaflow/cron"])["schedule"] == "0 0 * * ?"  # daily, from the recipe
    assert annotations["metaflow/project_name"] == "posttrain" and annotations["metaflow/branch_name"] == "test.nightly"
    jobsets = [t for t in template["spec"]["templates"] if "resource" in t]
    assert [t["name"] for t in jobsets] == ["train"]
    manifest = jobsets[0]["resource"]["manifest"]
    assert "kind: JobSet" in manifest and "name: control" in manifest and "name: worker" in manifest

    # Deployed with an event name, the flow also carries @trigger (Argo Events needs its settings).
    env.update(POSTTRAIN_TRIGGER_EVENT="posttrain-new-data", METAFLOW_ARGO_EVENTS_EVENT="metaflow-event",
               METAFLOW_ARGO_EVENTS_EVENT_SOURCE="argo-events-webhook",
               METAFLOW_ARGO_EVENTS_SERVICE_ACCOUNT="operate-workflow-sa")
    result = subprocess.run([sys.executable, str(FLOW), "argo-workflows", "create", "--only-json"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    annotations = json.loads(result.stdout[result.stdout.index("{"):])["metadata"]["annotations"]
    assert json.loads(annotations["metaflow/triggers"]) == [{"name": "posttrain-new-data", "type": "event"}]


@pytest.mark.slow
def test_retrain_on_two_drops_promotes_as_the_gate_says_then_refuses_without_new_data(tmp_path, builtin_model_dir):
    from metaflow import Run, Runner, metadata, namespace
    from test_flow import tiny_recipe

    drops = tmp_path / "drops"
    write_drop(drops / "2026-01-01.jsonl", 400, seed=1)
    recipe = tiny_recipe(tmp_path, retrain={"drops": str(drops)})
    sysroot = tmp_path / "metaflow"
    (sysroot / ".metaflow").mkdir(parents=True)
    env = {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(sysroot), "METAFLOW_USER": "posttrain-tests",
           "HF_HUB_OFFLINE": "1"}

    def run_once():
        with Runner(str(FLOW), show_output=False, env=env, cwd=str(sysroot),
                    config=[("recipe", str(recipe))]) as runner:
            result = runner.run()
            return result.status, result.run.id, result.stdout + result.stderr

    status, first_id, log = run_once()
    assert status == "successful", log[-6000:]
    write_drop(drops / "2026-01-02.jsonl", 400, seed=2)
    status, second_id, log = run_once()
    assert status == "successful", log[-6000:]
    status, _, log = run_once()
    assert status == "failed" and "no new data under retrain.drops=" in log and "retrain.force: true" in log

    metadata(f"local@{sysroot}")
    namespace(None)
    first = Run(f"RetrainFlow/{first_id}")["end"].task.data
    second = Run(f"RetrainFlow/{second_id}")["end"].task.data
    assert first.new_drops == [str(drops / "2026-01-01.jsonl")] and first.champion is None
    assert first.model_version == 1 and first.promotion["promoted"] is True
    # The second run saw only the new drop, started from the champion, and kept its eval set.
    assert second.new_drops == [str(drops / "2026-01-02.jsonl")]
    assert second.consumed_drops == [str(drops / "2026-01-01.jsonl"), str(drops / "2026-01-02.jsonl")]
    assert second.champion["version"] == 1 and second.lineage["base_model"] == "catalog-assistant v1 (champion)"
    assert second.dataset_manifest["splits"]["eval"] == first.dataset_manifest["splits"]["eval"]
    assert second.dataset_manifest["splits"]["train"]["fingerprint"] != first.dataset_manifest["splits"]["train"]["fingerprint"]
    # The gate's decision matches its numbers: promoted iff the candidate beats v1 by min_delta (0).
    decision = second.promotion
    assert second.model_version == 2 and decision["champion_version"] == 1
    assert decision["champion_value"] == first.best_checkpoint["task_score"]
    assert decision["candidate_value"] == second.best_checkpoint["task_score"]
    assert decision["promoted"] is (decision["candidate_value"] >= decision["champion_value"])
