"""Tests of steps/registry.py: numbered immutable versions, atomic claims, checksums, aliases, gate, CLI."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from steps.registry import ChecksumMismatch, ModelVersion, NotFoundError, Registry

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_BYTES = b'{"model_type": "llama", "hidden_size": 8}\n'


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


def test_register_twice_gives_versions_1_and_2_and_keeps_v1(tmp_path):
    registry = Registry(tmp_path / "registry")
    first = registry.register(
        "tiny", make_model_dir(tmp_path / "a"), {"metrics": {"eval_loss": 2.5}, "run": "SFTFlow/1"}
    )
    v1_manifest_bytes = (first.path / "manifest.json").read_bytes()
    second = registry.register(
        "tiny", make_model_dir(tmp_path / "b", b"other weights"), {"metrics": {"eval_loss": 2.0}}
    )

    assert (first.version, second.version) == (1, 2)
    assert first.uri == str(tmp_path / "registry" / "tiny" / "versions" / "1")
    assert first.manifest["files"] == {
        "config.json": {"sha256": sha256_of(CONFIG_BYTES), "bytes": len(CONFIG_BYTES)},
        "model.safetensors": {"sha256": sha256_of(b"\x00\x01\x02\x03weights"), "bytes": 11},
        "tokenizer/tokenizer.json": {"sha256": sha256_of(b"{}"), "bytes": 2},
    }
    assert [first.manifest[key] for key in ("name", "version", "run")] == ["tiny", 1, "SFTFlow/1"]
    assert first.manifest["created_at"].endswith("+00:00")
    # v1 is untouched by the second registration.
    assert (first.path / "manifest.json").read_bytes() == v1_manifest_bytes
    assert (first.path / "model.safetensors").read_bytes() == b"\x00\x01\x02\x03weights"
    assert registry.get("tiny", 1).manifest == first.manifest
    assert [v.version for v in registry.list("tiny")] == [1, 2]
    assert registry.get("tiny").version == 2
    assert registry.get("tiny", "2") == second
    assert registry.list_models() == ["tiny"]
    assert isinstance(first, ModelVersion)


def test_register_does_not_mutate_the_callers_manifest(tmp_path):
    registry = Registry(tmp_path / "registry")
    manifest = {"metrics": {"eval_loss": 1.0}}
    registry.register("tiny", make_model_dir(tmp_path / "a"), manifest)
    assert manifest == {"metrics": {"eval_loss": 1.0}}


def test_concurrent_registrations_from_8_processes_get_distinct_versions(tmp_path):
    root = tmp_path / "registry"
    model_dirs = [make_model_dir(tmp_path / f"m{i}", f"weights of writer {i}".encode()) for i in range(8)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(8) as pool:
        jobs = [(str(root), str(model_dir), index) for index, model_dir in enumerate(model_dirs)]
        versions = pool.starmap(register_in_subprocess, jobs)

    assert sorted(versions) == [1, 2, 3, 4, 5, 6, 7, 8]
    registry = Registry(root)
    for writer, version in enumerate(versions):
        pulled = registry.download("tiny", version, tmp_path / "pulled" / str(version))
        assert (pulled / "model.safetensors").read_bytes() == f"weights of writer {writer}".encode()
        assert registry.get("tiny", version).manifest["writer"] == writer
    assert os.listdir(root / "tiny" / ".staging") == []


def test_crashed_registration_is_invisible_and_does_not_block_the_next(tmp_path):
    registry = Registry(tmp_path / "registry")
    registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    # A registration that died after claiming 2: a claim, a half-copied staging folder,
    # and even a versions/2 folder without its manifest.
    (tmp_path / "registry" / "tiny" / "claims" / "2").write_text("{}")
    leftover = tmp_path / "registry" / "tiny" / ".staging" / "deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    (tmp_path / "registry" / "tiny" / "versions" / "2").mkdir()

    assert [v.version for v in registry.list("tiny")] == [1]
    assert registry.get("tiny").version == 1
    with pytest.raises(NotFoundError, match="no complete version 2"):
        registry.get("tiny", 2)

    third = registry.register("tiny", make_model_dir(tmp_path / "b"), {})
    assert third.version == 3
    assert [v.version for v in registry.list("tiny")] == [1, 3]
    assert registry.get("tiny").version == 3


def test_tampered_file_makes_download_raise_naming_the_file(tmp_path):
    registry = Registry(tmp_path / "registry")
    version = registry.register("tiny", make_model_dir(tmp_path / "a"), {})
    (version.path / "tokenizer" / "tokenizer.json").write_bytes(b"{ }")

    with pytest.raises(ChecksumMismatch, match="tokenizer/tokenizer.json") as caught:
        registry.download("tiny", 1, tmp_path / "pulled")
    assert caught.value.relpath == "tokenizer/tokenizer.json"
    assert caught.value.expected_sha256 == sha256_of(b"{}")
    assert caught.value.actual_sha256 == sha256_of(b"{ }")
    assert not (tmp_path / "pulled" / "tokenizer" / "tokenizer.json").exists()
    with pytest.raises(ChecksumMismatch, match="tokenizer/tokenizer.json"):
        registry.verify("tiny", 1)


def test_download_copies_files_and_manifest(tmp_path):
    registry = Registry(tmp_path / "registry")
    version = registry.register("tiny", make_model_dir(tmp_path / "a"), {"metrics": {"eval_loss": 2.0}})
    pulled = registry.download("tiny", "latest", tmp_path / "pulled")
    assert pulled == tmp_path / "pulled"
    assert sorted(p.relative_to(pulled).as_posix() for p in pulled.rglob("*") if p.is_file()) == [
        "config.json", "manifest.json", "model.safetensors", "tokenizer/tokenizer.json",
    ]
    assert json.loads((pulled / "manifest.json").read_text()) == version.manifest
    # Registering a pulled copy again does not take its old manifest as a model file.
    again = registry.register("tiny", pulled, {})
    assert again.version == 2
    assert sorted(again.manifest["files"]) == ["config.json", "model.safetensors", "tokenizer/tokenizer.json"]


def test_aliases_set_get_and_history(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFLOW_USER", "alice")
    registry = Registry(tmp_path / "registry")
    for letter in "abc":
        registry.register("tiny", make_model_dir(tmp_path / letter), {})

    registry.set_alias("tiny", "champion", 1, run="SFTFlow/11", reason="first")
    registry.set_alias("tiny", "staging", 3)
    registry.set_alias("tiny", "champion", 2, who="bob", reason="better")

    assert registry.aliases("tiny") == {"champion": 2, "staging": 3}
    assert registry.get("tiny", "champion").version == 2
    history = registry.alias_history("tiny")
    keys = ("alias", "version", "previous_version", "who", "run", "reason")
    assert [tuple(entry[key] for key in keys) for entry in history] == [
        ("champion", 1, None, "alice", "SFTFlow/11", "first"),
        ("staging", 3, None, "alice", None, None),
        ("champion", 2, 1, "bob", None, "better"),
    ]
    assert all(entry["when"].endswith("+00:00") for entry in history)

    with pytest.raises(NotFoundError, match="no alias 'prod'"):
        registry.get("tiny", "prod")
    with pytest.raises(NotFoundError, match="no complete version 9"):
        registry.set_alias("tiny", "champion", 9)
    with pytest.raises(ValueError, match="'latest'"):
        registry.set_alias("tiny", "latest", 1)
    with pytest.raises(ValueError, match="'42'"):
        registry.set_alias("tiny", "42", 1)


def test_gate_first_promotes_worse_keeps_better_promotes(tmp_path):
    registry = Registry(tmp_path / "registry")
    for letter, loss in zip("abc", (2.0, 1.98, 1.9)):
        registry.register("tiny", make_model_dir(tmp_path / letter), {"metrics": {"eval_loss": loss}})

    first = registry.promote_if_better(
        "tiny", 1, metric="eval_loss", min_delta=0.05, mode="min", run="SFTFlow/1"
    )
    decided_at = first.pop("decided_at")
    assert first == {
        "promoted": True, "alias": "champion", "metric": "eval_loss", "mode": "min", "version": 1,
        "candidate_value": 2.0, "champion_version": None, "champion_value": None, "min_delta": 0.05,
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
    assert json.loads((registry.get("tiny", 2).path / "promotion.json").read_text()) == not_enough
    assert "promotion.json" not in registry.get("tiny", 3).manifest["files"]
    registry.verify("tiny", 3)
    registry.download("tiny", "champion", tmp_path / "pulled")


def test_gate_mode_max_and_float_boundary(tmp_path):
    registry = Registry(tmp_path / "registry")
    for letter, accuracy in zip("abc", (0.5, 0.55, 0.6)):
        registry.register("tiny", make_model_dir(tmp_path / letter), {"metrics": {"task_accuracy": accuracy}})
    registry.promote_if_better("tiny", 1, metric="task_accuracy", min_delta=0.1)
    assert registry.promote_if_better("tiny", 2, metric="task_accuracy", min_delta=0.1)["promoted"] is False
    # 0.6 - 0.5 is 0.0999... in floats; it still counts as meeting min_delta=0.1.
    assert registry.promote_if_better("tiny", 3, metric="task_accuracy", min_delta=0.1)["promoted"] is True
    assert registry.promote_if_better("tiny", 3, metric="task_accuracy", min_delta=0.1)["promoted"] is False
    with pytest.raises(ValueError, match="'bleu'"):
        registry.promote_if_better("tiny", 3, metric="bleu", min_delta=0.0)


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


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "steps.registry", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )


def test_cli_list_show_pull_promote(tmp_path):
    root = tmp_path / "registry"
    registry = Registry(root)
    registry.register(
        "tiny", make_model_dir(tmp_path / "a"),
        {"metrics": {"eval_loss": 2.0, "token_accuracy": 0.25}, "run_pathspec": "SFTFlow/17/register/3"},
    )
    registry.register("tiny", make_model_dir(tmp_path / "b"), {"metrics": {"eval_loss": 1.5}})
    registry.set_alias("tiny", "champion", 1)

    listed = run_cli("--root", str(root), "list", "tiny")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["version", "created", "aliases", "metrics", "run"]
    assert lines[1].split()[0] == "1" and lines[1].split()[2:] == [
        "champion", "eval_loss=2", "token_accuracy=0.25", "SFTFlow/17/register/3",
    ]
    assert lines[2].split()[0] == "2" and lines[2].split()[2:] == ["-", "eval_loss=1.5", "-"]
    # Aligned: every column starts at the same offset on every line.
    assert lines[0].index("created") == lines[1].index(registry.get("tiny", 1).manifest["created_at"])

    models = run_cli("--root", str(root), "list")
    assert [line.split() for line in models.stdout.splitlines()] == [
        ["model", "versions", "latest", "aliases"], ["tiny", "2", "2", "champion=v1"],
    ]

    shown = run_cli("--root", str(root), "show", "tiny", "champion")
    assert shown.returncode == 0, shown.stderr
    shown_rows = [line.split() for line in shown.stdout.splitlines()]
    assert ["version", "1"] in shown_rows
    assert ["run", "SFTFlow/17/register/3"] in shown_rows
    assert ["eval_loss", "2"] in shown_rows
    assert ["model.safetensors", "11", sha256_of(b"\x00\x01\x02\x03weights")] in shown_rows

    pulled = run_cli("--root", str(root), "pull", "tiny", "2", str(tmp_path / "pulled"))
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "pulled" / "config.json").read_bytes() == CONFIG_BYTES

    promoted = run_cli("--root", str(root), "promote", "tiny", "2")
    assert promoted.stdout == "tiny: champion -> v2 (was v1)\n"
    gated = run_cli("--root", str(root), "promote", "tiny", "1", "--metric", "eval_loss", "--mode", "min")
    assert gated.stdout.startswith("promoted=False: kept: eval_loss 2 vs champion v2 1.5")
    assert registry.aliases("tiny") == {"champion": 2}

    missing = run_cli("--root", str(root), "show", "tiny", "7")
    assert (missing.returncode, missing.stderr) == (1, "error: model 'tiny' has no complete version 7\n")
