"""Tests of steps/registry.py on both backends (a local folder and a real moto S3 endpoint):
numbered immutable versions, atomic claims, crash safety, checksums, aliases, the gate, the CLI."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from steps import storage
from steps.registry import ChecksumMismatch, ModelVersion, NotFoundError, Registry

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_BYTES = b'{"model_type": "llama", "hidden_size": 8}\n'


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A registry root: a local folder, or a prefix in a fresh bucket on the moto endpoint."""
    if request.param == "local":
        return str(tmp_path / "registry")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/registry"


def make_model_dir(path: Path, weights: bytes = b"\x00\x01\x02\x03weights") -> Path:
    """A stand-in model folder: a config, a weights file and one nested file."""
    path.mkdir(parents=True)
    (path / "config.json").write_bytes(CONFIG_BYTES)
    (path / "model.safetensors").write_bytes(weights)
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "tokenizer.json").write_bytes(b"{}")
    return path


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def register_in_subprocess(root: str, model_dir: str, index: int) -> int:
    return Registry(root).register("tiny", model_dir, {"writer": index}).version


def gate_in_subprocess(root: str, version: int) -> bool:
    return Registry(root).promote_if_better("tiny", version, metric="score", min_delta=0.0)["promoted"]


def test_register_twice_gives_versions_1_and_2_and_keeps_v1(root, tmp_path):
    registry = Registry(root)
    first = registry.register(
        "tiny", make_model_dir(tmp_path / "a"), {"metrics": {"eval_loss": 2.5}, "run": "SFTFlow/1"}
    )
    v1_manifest_bytes = storage.read_bytes(storage.join(first.uri, "manifest.json"))
    second = registry.register(
        "tiny", make_model_dir(tmp_path / "b", b"other weights"), {"metrics": {"eval_loss": 2.0}}
    )

    assert (first.version, second.version) == (1, 2)
    assert first.uri == storage.join(root, "tiny", "versions", "1")
    assert first.manifest["files"] == {
        "config.json": {"sha256": sha256_of(CONFIG_BYTES), "bytes": len(CONFIG_BYTES)},
        "model.safetensors": {"sha256": sha256_of(b"\x00\x01\x02\x03weights"), "bytes": 11},
        "tokenizer/tokenizer.json": {"sha256": sha256_of(b"{}"), "bytes": 2},
    }
    assert [first.manifest[key] for key in ("name", "version", "run")] == ["tiny", 1, "SFTFlow/1"]
    assert first.manifest["created_at"].endswith("+00:00")
    # v1 is untouched by the second registration; the files sit under versions/1/.
    assert storage.read_bytes(storage.join(first.uri, "manifest.json")) == v1_manifest_bytes
    assert storage.read_bytes(storage.join(first.uri, "model.safetensors")) == b"\x00\x01\x02\x03weights"
    assert storage.list_files(first.uri) == [
        storage.join(first.uri, relpath)
        for relpath in ("config.json", "manifest.json", "model.safetensors", "tokenizer/tokenizer.json")
    ]
    assert registry.get("tiny", 1).manifest == first.manifest
    assert [v.version for v in registry.list("tiny")] == [1, 2]
    assert registry.get("tiny").version == 2
    assert registry.get("tiny", "2") == second
    assert registry.list_models() == ["tiny"]
    assert isinstance(first, ModelVersion)


def test_model_version_path_is_local_only(root, tmp_path):
    version = Registry(root).register("tiny", make_model_dir(tmp_path / "a"), {})
    if storage.is_s3(root):
        with pytest.raises(ValueError, match="is on S3"):
            version.path
    else:
        assert version.path == Path(root) / "tiny" / "versions" / "1"


def test_register_does_not_mutate_the_callers_manifest(root, tmp_path):
    registry = Registry(root)
    manifest = {"metrics": {"eval_loss": 1.0}}
    registry.register("tiny", make_model_dir(tmp_path / "a"), manifest)
    assert manifest == {"metrics": {"eval_loss": 1.0}}


def test_concurrent_registrations_from_8_processes_get_distinct_complete_versions(root, tmp_path):
    model_dirs = [make_model_dir(tmp_path / f"m{i}", f"weights of writer {i}".encode()) for i in range(8)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(8) as pool:
        jobs = [(root, str(model_dir), index) for index, model_dir in enumerate(model_dirs)]
        versions = pool.starmap(register_in_subprocess, jobs)

    assert sorted(versions) == [1, 2, 3, 4, 5, 6, 7, 8]
    registry = Registry(root)
    assert [v.version for v in registry.list("tiny")] == [1, 2, 3, 4, 5, 6, 7, 8]
    for writer, version in enumerate(versions):
        pulled = registry.download("tiny", version, tmp_path / "pulled" / str(version))
        assert (pulled / "model.safetensors").read_bytes() == f"weights of writer {writer}".encode()
        assert registry.get("tiny", version).manifest["writer"] == writer
    if not storage.is_s3(root):
        assert os.listdir(Path(root) / "tiny" / ".staging") == []


KILL_BEFORE_MANIFEST = textwrap.dedent("""
    import os, sys
    from steps import registry, storage

    write_bytes = storage.write_bytes

    def die_before_the_manifest(uri, data):
        if str(uri).endswith("manifest.json"):
            os._exit(9)  # a hard kill: no except, no finally, no cleanup runs
        write_bytes(uri, data)

    storage.write_bytes = die_before_the_manifest
    registry.Registry(sys.argv[1]).register("tiny", sys.argv[2], {})
""")


def test_registration_killed_midway_is_invisible_and_does_not_block_the_next(root, tmp_path):
    registry = Registry(root)
    registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    killed = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_MANIFEST, root, str(make_model_dir(tmp_path / "b"))],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )
    assert killed.returncode == 9, killed.stderr
    # It died after claiming 2 and putting every file in place, before the manifest.
    assert storage.exists(storage.join(root, "tiny", "claims", "2"))
    if storage.is_s3(root):
        assert storage.exists(storage.join(root, "tiny", "versions", "2", "model.safetensors"))

    assert [v.version for v in registry.list("tiny")] == [1]
    assert registry.get("tiny").version == 1
    assert registry.list_models() == ["tiny"]
    with pytest.raises(NotFoundError, match="no complete version 2"):
        registry.get("tiny", 2)

    third = registry.register("tiny", make_model_dir(tmp_path / "c"), {})
    assert third.version == 3
    assert [v.version for v in registry.list("tiny")] == [1, 3]
    assert registry.get("tiny").version == 3
    registry.verify("tiny", 3)


def test_a_version_folder_without_a_claim_still_blocks_its_number(root, tmp_path):
    registry = Registry(root)
    registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    # Files copied in by hand under versions/2/ (no claim, no manifest).
    storage.write_bytes(storage.join(root, "tiny", "versions", "2", "model.safetensors"), b"half")
    assert registry.register("tiny", make_model_dir(tmp_path / "b"), {}).version == 3


def test_tampered_file_makes_download_raise_naming_the_file(root, tmp_path):
    registry = Registry(root)
    version = registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    storage.write_bytes(storage.join(version.uri, "tokenizer", "tokenizer.json"), b"{ }")

    with pytest.raises(ChecksumMismatch, match="tokenizer/tokenizer.json") as caught:
        registry.download("tiny", 1, tmp_path / "pulled")
    assert caught.value.relpath == "tokenizer/tokenizer.json"
    assert caught.value.expected_sha256 == sha256_of(b"{}")
    assert caught.value.actual_sha256 == sha256_of(b"{ }")
    assert not (tmp_path / "pulled" / "tokenizer" / "tokenizer.json").exists()
    # Nothing at all lands: the pull went to a staging folder, removed on the mismatch.
    assert not (tmp_path / "pulled").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pulled")] == []
    with pytest.raises(ChecksumMismatch, match="tokenizer/tokenizer.json"):
        registry.verify("tiny", 1)


def test_download_copies_files_and_manifest(root, tmp_path):
    registry = Registry(root)
    version = registry.register("tiny", make_model_dir(tmp_path / "a"), {"metrics": {"eval_loss": 2.0}})
    pulled = registry.download("tiny", "latest", tmp_path / "pulled")
    assert pulled == tmp_path / "pulled"
    assert sorted(p.relative_to(pulled).as_posix() for p in pulled.rglob("*") if p.is_file()) == [
        "config.json", "manifest.json", "model.safetensors", "tokenizer/tokenizer.json",
    ]
    assert (pulled / "config.json").read_bytes() == CONFIG_BYTES
    assert json.loads((pulled / "manifest.json").read_text()) == version.manifest
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []  # no staging folder left
    # Registering a pulled copy again does not take its old manifest as a model file.
    again = registry.register("tiny", pulled, {})
    assert again.version == 2
    assert sorted(again.manifest["files"]) == ["config.json", "model.safetensors", "tokenizer/tokenizer.json"]


def test_aliases_set_get_and_history(root, tmp_path, monkeypatch):
    monkeypatch.setenv("METAFLOW_USER", "alice")
    registry = Registry(root)
    for letter in "abc":
        registry.register("tiny", make_model_dir(tmp_path / letter), {})

    registry.set_alias("tiny", "champion", 1, run="SFTFlow/11", reason="first")
    registry.set_alias("tiny", "candidate", 3)
    registry.set_alias("tiny", "champion", 2, who="bob", reason="better")

    assert registry.aliases("tiny") == {"candidate": 3, "champion": 2}
    assert registry.get("tiny", "champion").version == 2
    history = registry.alias_history("tiny")
    keys = ("alias", "version", "previous_version", "who", "run", "reason", "seq")
    assert [tuple(entry[key] for key in keys) for entry in history] == [
        ("champion", 1, None, "alice", "SFTFlow/11", "first", 1),
        ("candidate", 3, None, "alice", None, None, 1),
        ("champion", 2, 1, "bob", None, "better", 2),
    ]
    assert all(entry["when"].endswith("+00:00") for entry in history)
    # Each move is its own object; the alias points at the newest.
    first_move = storage.join(root, "tiny", "aliases", "champion", "history", "1.json")
    assert json.loads(storage.read_bytes(first_move))["version"] == 1

    with pytest.raises(NotFoundError, match="no alias 'prod'"):
        registry.get("tiny", "prod")
    with pytest.raises(NotFoundError, match="no complete version 9"):
        registry.set_alias("tiny", "champion", 9)
    with pytest.raises(ValueError, match="'latest'"):
        registry.set_alias("tiny", "latest", 1)
    with pytest.raises(ValueError, match="'42'"):
        registry.set_alias("tiny", "42", 1)


def test_gate_first_promotes_worse_keeps_better_promotes(root, tmp_path):
    registry = Registry(root)
    for letter, loss in zip("abc", (2.0, 1.98, 1.9)):
        registry.register("tiny", make_model_dir(tmp_path / letter), {"metrics": {"eval_loss": loss}})

    first = registry.promote_if_better(
        "tiny", 1, metric="eval_loss", min_delta=0.05, mode="min", run="SFTFlow/1"
    )
    decided_at = first.pop("decided_at")
    assert first == {
        "promoted": True, "alias": "champion", "metric": "eval_loss", "mode": "min", "version": 1,
        "candidate_value": 2.0, "champion_version": None, "champion_value": None, "min_delta": 0.05,
        "candidate_eval_set": None, "champion_eval_set": None, "run": "SFTFlow/1",
        "reason": "no current champion",
    }
    assert decided_at.endswith("+00:00")
    assert registry.alias_history("tiny")[0]["run"] == "SFTFlow/1"
    assert registry.aliases("tiny") == {"champion": 1}

    not_enough = registry.promote_if_better("tiny", 2, metric="eval_loss", min_delta=0.05, mode="min")
    assert [not_enough[key] for key in ("promoted", "champion_version", "champion_value")] == [False, 1, 2.0]
    assert not_enough["reason"] == (
        "kept: eval_loss 1.98 vs champion v1 2 (lower is better, improvement 0.02, min_delta 0.05)"
    )
    assert registry.aliases("tiny") == {"champion": 1}

    better = registry.promote_if_better("tiny", 3, metric="eval_loss", min_delta=0.05, mode="min")
    assert (better["promoted"], better["champion_version"], better["candidate_value"]) == (True, 1, 1.9)
    assert registry.aliases("tiny") == {"champion": 3}
    history = registry.alias_history("tiny")
    assert [(entry["version"], entry["previous_version"]) for entry in history] == [(1, None), (3, 1)]

    # The decision sits beside the version, and the checksummed files stay valid.
    assert registry.promotion("tiny", 2) == not_enough
    promotion_uri = storage.join(registry.get("tiny", 2).uri, "promotion.json")
    assert json.loads(storage.read_bytes(promotion_uri)) == not_enough
    assert registry.promotion("tiny", 3) == better
    assert "promotion.json" not in registry.get("tiny", 3).manifest["files"]
    registry.verify("tiny", 3)
    registry.download("tiny", "champion", tmp_path / "pulled")


def test_gate_refuses_a_champion_scored_on_another_eval_set(root, tmp_path):
    registry = Registry(root)
    eval_sets = ["evalA", "evalB", "evalA", None]
    for index, (eval_set, score) in enumerate(zip(eval_sets, (0.5, 0.9, 0.6, 0.99))):
        manifest = {"metrics": {"task_score": score}}
        if eval_set:
            manifest["eval_set"] = {"fingerprint": eval_set, "num_conversations": 80}
        registry.register("tiny", make_model_dir(tmp_path / str(index)), manifest)
    assert registry.promote_if_better("tiny", 1, metric="task_score", min_delta=0.05)["promoted"] is True

    other_set = registry.promote_if_better("tiny", 2, metric="task_score", min_delta=0.05)
    assert other_set["promoted"] is False
    assert other_set["reason"] == (
        "kept: champion v1 was scored on eval set 'evalA', the candidate on 'evalB'; "
        "the numbers are not comparable"
    )
    assert (other_set["candidate_eval_set"], other_set["champion_eval_set"]) == ("evalB", "evalA")
    unknown_set = registry.promote_if_better("tiny", 4, metric="task_score", min_delta=0.05)
    assert unknown_set["promoted"] is False
    assert "eval set 'evalA', the candidate on None" in unknown_set["reason"]
    same_set = registry.promote_if_better("tiny", 3, metric="task_score", min_delta=0.05)
    assert same_set["promoted"] is True and registry.aliases("tiny") == {"champion": 3}


def test_gate_refuses_a_champion_scored_by_another_evaluator_version(root, tmp_path):
    # Same eval conversations, but the evaluator's numbers changed meaning (catalog v1 -> v2):
    # a lower task_score under the new scorer must not be compared with the old one.
    registry = Registry(root)
    scorers = ["builtin:catalog@1", "builtin:catalog@2", "builtin:catalog@2"]
    for index, (scorer, score) in enumerate(zip(scorers, (0.99, 0.85, 0.9))):
        manifest = {"metrics": {"task_score": score},
                    "eval_set": {"fingerprint": "evalA", "num_conversations": 80, "scorers": scorer}}
        registry.register("tiny", make_model_dir(tmp_path / str(index)), manifest)
    registry.promote_if_better("tiny", 1, metric="task_score", min_delta=0.0)
    new_scorer = registry.promote_if_better("tiny", 2, metric="task_score", min_delta=0.0)
    assert new_scorer["promoted"] is False
    assert new_scorer["reason"] == (
        "kept: champion v1 was scored on eval set 'evalA scored by builtin:catalog@1', the candidate on "
        "'evalA scored by builtin:catalog@2'; the numbers are not comparable")
    registry.set_alias("tiny", "champion", 2)
    assert registry.promote_if_better("tiny", 3, metric="task_score", min_delta=0.0)["promoted"] is True


def test_gate_mode_max_and_float_boundary(root, tmp_path):
    registry = Registry(root)
    for letter, accuracy in zip("abc", (0.5, 0.55, 0.6)):
        registry.register("tiny", make_model_dir(tmp_path / letter), {"metrics": {"task_accuracy": accuracy}})
    registry.promote_if_better("tiny", 1, metric="task_accuracy", min_delta=0.1)
    assert registry.promote_if_better("tiny", 2, metric="task_accuracy", min_delta=0.1)["promoted"] is False
    # 0.6 - 0.5 is 0.0999... in floats; it still counts as meeting min_delta=0.1.
    assert registry.promote_if_better("tiny", 3, metric="task_accuracy", min_delta=0.1)["promoted"] is True
    assert registry.promote_if_better("tiny", 3, metric="task_accuracy", min_delta=0.1)["promoted"] is False
    with pytest.raises(ValueError, match="'bleu'"):
        registry.promote_if_better("tiny", 3, metric="bleu", min_delta=0.0)


def test_concurrent_gates_end_with_the_best_version_as_champion(root, tmp_path):
    """8 processes gate versions scored 1..8 at once. A gate whose read-decide-move races
    could let a worse version overwrite a better one that moved in between; a race-free gate
    always ends on v8, and every move in the history improves on the one before it."""
    registry = Registry(root)
    for index in range(8):
        registry.register("tiny", make_model_dir(tmp_path / str(index)), {"metrics": {"score": index + 1.0}})
    context = multiprocessing.get_context("spawn")
    with context.Pool(8) as pool:
        promoted = pool.starmap(gate_in_subprocess, [(root, version) for version in range(1, 9)])

    assert registry.aliases("tiny") == {"champion": 8}
    history = registry.alias_history("tiny")
    assert [entry["seq"] for entry in history] == list(range(1, len(history) + 1))
    assert [entry["previous_version"] for entry in history] == [None] + [e["version"] for e in history[:-1]]
    assert all(a["version"] < b["version"] for a, b in zip(history, history[1:]))
    assert sum(promoted) == len(history)
    assert promoted[7] is True


@pytest.mark.parametrize("bad_name", ["../x", "a/b", "", "..", "a..b", "-x", "x" * 129])
def test_invalid_names_are_rejected(tmp_path, bad_name):
    registry = Registry(tmp_path / "registry")
    with pytest.raises(ValueError, match="invalid name"):
        registry.register(bad_name, make_model_dir(tmp_path / "a"), {})
    with pytest.raises(ValueError, match="invalid name"):
        registry.get(bad_name)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bad_alias", ["../x", "a/b", "..", "7", "latest"])
def test_invalid_aliases_are_rejected(tmp_path, bad_alias):
    registry = Registry(tmp_path / "registry")
    registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    with pytest.raises(ValueError, match="invalid alias"):
        registry.set_alias("tiny", bad_alias, 1)
    with pytest.raises(ValueError, match="invalid alias"):
        registry.promote_if_better("tiny", 1, metric="x", min_delta=0.0, alias=bad_alias)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "steps.registry", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )


def test_cli_list_show_pull_promote(root, tmp_path):
    registry = Registry(root)
    registry.register(
        "tiny", make_model_dir(tmp_path / "a"),
        {"metrics": {"eval_loss": 2.0, "assistant_token_accuracy": 0.25},
         "run_pathspec": "SFTFlow/17/register/3"},
    )
    registry.register("tiny", make_model_dir(tmp_path / "b"), {"metrics": {"eval_loss": 1.5}})
    registry.set_alias("tiny", "champion", 1)

    listed = run_cli("--root", root, "list", "tiny")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["version", "created", "aliases", "metrics", "run"]
    assert lines[1].split()[0] == "1" and lines[1].split()[2:] == [
        "champion", "eval_loss=2", "assistant_token_accuracy=0.25", "SFTFlow/17/register/3",
    ]
    assert lines[2].split()[0] == "2" and lines[2].split()[2:] == ["-", "eval_loss=1.5", "-"]
    # Aligned: every column starts at the same offset on every line.
    assert lines[0].index("created") == lines[1].index(registry.get("tiny", 1).manifest["created_at"])
    column = lines[0].index("aliases")
    assert lines[1][column:].startswith("champion ") and lines[2][column:].startswith("- ")

    models = run_cli("--root", root, "list")
    assert [line.split() for line in models.stdout.splitlines()] == [
        ["model", "versions", "latest", "aliases"], ["tiny", "2", "2", "champion=v1"],
    ]

    shown = run_cli("--root", root, "show", "tiny", "champion")
    assert shown.returncode == 0, shown.stderr
    shown_rows = [line.split() for line in shown.stdout.splitlines()]
    assert ["version", "1"] in shown_rows
    assert ["uri", storage.join(root, "tiny", "versions", "1")] in shown_rows
    assert ["run", "SFTFlow/17/register/3"] in shown_rows
    assert ["eval_loss", "2"] in shown_rows
    assert ["model.safetensors", "11", sha256_of(b"\x00\x01\x02\x03weights")] in shown_rows

    pulled = run_cli("--root", root, "pull", "tiny", "2", str(tmp_path / "pulled"))
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "pulled" / "config.json").read_bytes() == CONFIG_BYTES

    promoted = run_cli("--root", root, "promote", "tiny", "2")
    assert promoted.stdout == "tiny: champion -> v2 (was v1)\n"
    gated = run_cli("--root", root, "promote", "tiny", "1", "--metric", "eval_loss", "--mode", "min")
    assert gated.stdout.startswith("promoted=False: kept: eval_loss 2 vs champion v2 1.5")
    assert registry.aliases("tiny") == {"champion": 2}
    shown_after_gate = run_cli("--root", root, "show", "tiny", "1")
    assert "last gate decision: promoted=False (kept: eval_loss 2 vs champion v2 1.5" in shown_after_gate.stdout

    missing = run_cli("--root", root, "show", "tiny", "7")
    assert (missing.returncode, missing.stderr) == (1, "error: model 'tiny' has no complete version 7\n")
