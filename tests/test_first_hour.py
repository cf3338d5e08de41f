"""A new user's first hour: dropping data for the retrain (locally and on S3), the production
recipe, the deploy rehearsal on one machine, and the install bounds that keep pip from backtracking."""

import json
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT
from steps import retrain, storage
from steps.config import load_recipe, recipe_from_dict

NOW = datetime(2026, 12, 8, 9, 15, tzinfo=timezone.utc)


def a_drop_file(folder: Path, name: str = "events.jsonl", text: str = '{"prompt": "hi", "completion": "hello"}\n') -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def test_drop_copies_under_a_time_sorted_name_and_the_next_retrain_picks_it_up(tmp_path):
    drops = tmp_path / "drops"
    recipe = recipe_from_dict({"retrain": {"drops": str(drops)}})
    first = a_drop_file(tmp_path / "exports")
    assert retrain.drop_files([first], str(drops), now=NOW) == [str(drops / "2026-12-08T0915-events.jsonl")]
    assert (drops / "2026-12-08T0915-events.jsonl").read_text() == first.read_text()
    assert sorted(p.name for p in drops.iterdir()) == ["2026-12-08T0915-events.jsonl"]  # no partial left
    assert retrain.select_drops(recipe, [], None) == [str(drops / "2026-12-08T0915-events.jsonl")]

    # A later drop sorts after it, and is the only new one for a run that consumed the first.
    later = a_drop_file(tmp_path / "exports", "more.parquet", "x")
    [second] = retrain.drop_files([later], str(drops), now=NOW.replace(hour=10))
    assert retrain.list_drops(str(drops)) == [str(drops / "2026-12-08T0915-events.jsonl"), second]
    assert retrain.select_drops(recipe, [str(drops / "2026-12-08T0915-events.jsonl")], "RetrainFlow/1") == [second]


def test_drop_never_overwrites_and_refuses_what_the_retrain_would_ignore(tmp_path):
    drops = tmp_path / "drops"
    file = a_drop_file(tmp_path / "exports")
    [existing] = retrain.drop_files([file], str(drops), now=NOW)
    file.write_text('{"prompt": "changed", "completion": "!"}\n')
    with pytest.raises(retrain.DropExists, match="never overwritten"):
        retrain.drop_files([file], str(drops), now=NOW)
    assert Path(existing).read_text() == '{"prompt": "hi", "completion": "hello"}\n'
    with pytest.raises(ValueError, match="is not a drop"):
        retrain.drop_files([a_drop_file(tmp_path, "notes.csv")], str(drops), now=NOW)
    with pytest.raises(FileNotFoundError):
        retrain.drop_files([tmp_path / "missing.jsonl"], str(drops), now=NOW)
    # All checks come before any write: one bad file among good ones writes nothing.
    good = a_drop_file(tmp_path / "exports", "good.jsonl")
    with pytest.raises(ValueError):
        retrain.drop_files([good, tmp_path / "notes.csv"], str(drops), now=NOW)
    assert retrain.list_drops(str(drops)) == [existing]


def test_drop_command_with_a_recipe_prints_what_the_next_retrain_picks_up(tmp_path):
    drops = tmp_path / "drops"
    recipe_path = tmp_path / "retrain.yaml"
    recipe_path.write_text(f"retrain:\n  drops: {drops}\n")
    file = a_drop_file(tmp_path / "exports")
    result = subprocess.run([sys.executable, "-m", "steps.retrain", "drop", str(file), "--recipe", str(recipe_path)],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    [name] = [p.name for p in drops.iterdir()]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d{4}-events\.jsonl", name)
    assert f"dropped 1 file(s) into {drops}:\n  {name}\nThe next retrain" in result.stdout
    assert "1 drop(s) are there in all" in result.stdout
    assert retrain.select_drops(load_recipe(recipe_path), [], None) == [str(drops / name)]

    # --recipe and --drops are exclusive; an error is one line on stderr, exit status 1.
    with pytest.raises(SystemExit):
        retrain.main(["drop", str(file), "--drops", str(drops), "--recipe", str(recipe_path)])
    assert retrain.main(["drop", str(tmp_path / "missing.jsonl"), "--drops", str(drops)]) == 1


def test_drop_uploads_to_s3_and_the_next_retrain_picks_it_up(s3_bucket, tmp_path, capsys):
    drops = f"s3://{s3_bucket}/posttrain/drops"
    recipe = recipe_from_dict({"retrain": {"drops": drops}})
    file = a_drop_file(tmp_path)
    assert retrain.main(["drop", str(file), "--drops", drops]) == 0
    [uploaded] = retrain.list_drops(drops)
    assert re.fullmatch(rf"{drops}/\d{{4}}-\d\d-\d\dT\d{{4}}-events\.jsonl", uploaded)
    assert storage.read_bytes(uploaded) == file.read_bytes()
    assert f"dropped 1 file(s) into {drops}:" in capsys.readouterr().out
    assert retrain.select_drops(recipe, [], None) == [uploaded]

    fixed = retrain.drop_files([file], drops, now=NOW)
    with pytest.raises(retrain.DropExists):
        retrain.drop_files([file], drops, now=NOW)
    # Even past the existence check (a writer racing for the same name), the conditional put refuses.
    with pytest.raises(retrain.DropExists):
        retrain._put_new(file, fixed[0])
    assert retrain.select_drops(recipe, [uploaded], "RetrainFlow/1") == fixed


def test_the_production_recipe_keeps_registry_and_drops_on_s3():
    recipe = load_recipe(PROJECT_ROOT / "configs" / "retrain_prod.yaml")
    assert recipe.registry_root.startswith("s3://") and recipe.retrain.drops.startswith("s3://")
    assert recipe.retrain.schedule == "daily"


def test_deploy_rehearsal_renders_the_schedule_the_jobset_and_the_image(tmp_path):
    """`python infra/deploy_rehearsal.py`: local S3, a Metaflow profile from the shipped template,
    a drop, and the production deployment's Argo templates (with and without the event trigger)."""
    image = "registry.example.com/posttrain:rehearsal"
    result = subprocess.run([sys.executable, "infra/deploy_rehearsal.py", "--out", str(tmp_path), "--image", image],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rehearsal passed" in result.stdout and "local S3 stopped" in result.stdout
    for name in ("scheduled", "with_trigger"):
        template = json.loads((tmp_path / f"workflow_template_{name}.json").read_text())
        assert template["kind"] == "WorkflowTemplate"
        annotations = template["metadata"]["annotations"]
        assert json.loads(annotations["metaflow/cron"])["schedule"] == "0 0 * * ?"  # daily, retrain_prod.yaml
        assert annotations["metaflow/branch_name"] == "prod"
        [jobset] = [t for t in template["spec"]["templates"] if "resource" in t]
        manifest = jobset["resource"]["manifest"]
        assert jobset["name"] == "train" and "kind: JobSet" in manifest and "name: worker" in manifest
        assert f"image: {image}" in manifest
    triggered = json.loads((tmp_path / "workflow_template_with_trigger.json").read_text())
    assert json.loads(triggered["metadata"]["annotations"]["metaflow/triggers"])[0]["name"] == "posttrain-new-data"


BOUNDED = ["transformers", "pandas", "boto3", "datasets", "peft", "tokenizers", "moto"]
"""The packages pip backtracked through (boto3 bounds botocore: it pins it), and their neighbours."""


def test_dependencies_that_made_pip_backtrack_are_bounded():
    """A fresh `pip install -e ".[dev]"` backtracked for minutes through old releases of these
    (docs/install.md); each needs a lower bound close to what the resolver settles on."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    notebooks = project["optional-dependencies"]["notebooks"]
    assert any(r.startswith(("jupyterlab", "notebook")) for r in notebooks)
    named = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]: r for r in requirements}
    for name in BOUNDED:
        assert name in named and ">=" in named[name] and "<" in named[name], f"{name}: {named.get(name)}"
