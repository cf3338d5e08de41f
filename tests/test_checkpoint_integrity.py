"""Checkpoints are checksummed when written and verified on resume: a truncated, corrupted or
incomplete latest checkpoint is skipped with a warning naming it and why, the newest sound one
is used, and when none is sound the error names every candidate and its problem."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from steps import checkpoint, launch
from steps.checkpoint import NoUsableCheckpoint, latest_checkpoint, problem_of


def _write_checkpoint(root: Path, step: int, *, legacy: bool = False) -> Path:
    """A checkpoint as the trainer writes it (files, then the state with their checksums)."""
    tmp = checkpoint.begin(root, step)
    (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 40 + step.to_bytes(4, "little"))
    (tmp / "config.json").write_text('{"model_type": "llama"}')
    (tmp / "optimizer.pt").write_bytes(b"optimizer" * 100)
    (tmp / "scheduler.pt").write_bytes(b"scheduler")
    (tmp / "rng-rank0.pt").write_bytes(b"rng")
    final = checkpoint.commit(tmp, step, {"step": step, "train_curve": [], "world_size": 1})
    if legacy:  # written before checksums existed
        state = checkpoint.read_state(final)
        del state["files"]
        (final / checkpoint.STATE_FILE).write_text(json.dumps(state))
    return final


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# Each damage leaves the newest checkpoint (step 20) unusable; the problem its warning names.
DAMAGES = {
    "truncated-state": (lambda c: (c / "trainer_state.json").write_text('{"step": 20, "train_cu'),
                        "trainer_state.json is unreadable (JSONDecodeError"),
    "state-not-an-object": (lambda c: (c / "trainer_state.json").write_text("[]"), "trainer_state.json has no step"),
    "missing-optimizer": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "missing-rng": (lambda c: (c / "rng-rank0.pt").unlink(), "rng-rank0.pt is missing"),
    "truncated-weights": (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:99]),
                          "model.safetensors has 99 bytes, 10244 were written (truncated?)"),
    "flipped-weight-byte": (lambda c: _flip_byte(c / "model.safetensors"),
                            "model.safetensors does not match the sha256 written with it (corrupted)"),
    "flipped-optimizer-byte": (lambda c: _flip_byte(c / "optimizer.pt", 3), "optimizer.pt does not match the sha256"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path, damage):
    older, newest = _write_checkpoint(tmp_path, 10), _write_checkpoint(tmp_path, 20)
    assert latest_checkpoint([tmp_path]) == newest.resolve()
    harm, problem = DAMAGES[damage]
    harm(newest)
    with pytest.warns(UserWarning, match=f"skipping checkpoint {newest.resolve()}: ") as caught:
        assert latest_checkpoint([tmp_path]) == older.resolve()
    assert problem in str(caught[0].message)


def test_with_no_sound_checkpoint_the_error_names_each_candidate_and_its_problem(tmp_path, recwarn):
    first, second = _write_checkpoint(tmp_path / "origin", 10), _write_checkpoint(tmp_path / "run", 20)
    _flip_byte(first / "model.safetensors")
    (second / "scheduler.pt").unlink()
    with pytest.raises(NoUsableCheckpoint) as error:
        latest_checkpoint([tmp_path / "run", tmp_path / "origin"])
    lines = str(error.value).splitlines()[1:]
    assert [line.split(": ", 1)[0].strip() for line in lines] == [str(second.resolve()), str(first.resolve())]
    assert "scheduler.pt is missing" in lines[0] and "model.safetensors does not match" in lines[1]
    assert latest_checkpoint([tmp_path / "nothing-here"]) is None  # no checkpoint at all: a fresh start


def test_legacy_checkpoints_without_checksums_are_checked_for_what_resume_needs(tmp_path):
    ckpt = _write_checkpoint(tmp_path, 10, legacy=True)
    assert problem_of(ckpt) is None
    (ckpt / "optimizer.pt").unlink()
    assert problem_of(ckpt) == "missing the optimizer state"


def test_pruned_checkpoints_keep_verifiable_weights_and_are_passed_over_silently(tmp_path, recwarn):
    ckpts = [_write_checkpoint(tmp_path, step) for step in (10, 20, 30)]
    checkpoint.prune(tmp_path, keep_last=1, keep_weights=True)
    state = checkpoint.read_state(ckpts[0])
    assert state["weights_only"] and sorted(state["files"]) == ["config.json", "model.safetensors"]
    assert problem_of(ckpts[0]) == "its resume state was pruned (weights only)"
    assert latest_checkpoint([tmp_path]) == ckpts[2].resolve() and not recwarn.list
    shutil.rmtree(ckpts[2])
    assert latest_checkpoint([tmp_path]) is None  # only weights-only ones: nothing to resume, no error


@pytest.mark.slow
def test_training_resumes_past_a_corrupted_latest_checkpoint_to_the_same_weights(tmp_path, builtin_model_dir):
    """End to end: train 12 steps (checkpoints at 6 and 12), flip one byte of step 12's weights,
    train again: it skips step 12 (its log says why), resumes from step 6 and ends with the
    weights of the uninterrupted run, bit for bit."""
    from steps import chat
    from steps.config import recipe_from_dict
    from steps.ingest import ingest

    recipe = recipe_from_dict({
        "storage": str(tmp_path / "store"), "seed": 0,
        "data": {"builtin_num_conversations": 300, "eval_fraction": 0.1}, "tokenize": {"max_seq_tokens": 256},
        "train": {"micro_batch_tokens": 1024, "global_batch_tokens": 1024, "max_steps": 12, "warmup_steps": 2,
                  "lr": 3e-3, "save_every_steps": 6, "log_every_steps": 2, "num_threads": 1}})
    run_root = tmp_path / "run"
    token_stats = chat.tokenize_splits(recipe, str(builtin_model_dir), ingest(recipe, str(run_root)), str(run_root))

    def train_once(key: str) -> dict:
        return launch.run_node(recipe, str(builtin_model_dir), token_stats, str(run_root), node_index=0,
                               num_nodes=1, main_ip="127.0.0.1", run_key=f"{tmp_path}/{key}")

    first = train_once("first")
    final = Path(first["checkpoints"][-1])
    # Copies: load_file may map the file, whose bytes the next line changes in place.
    expected = {name: tensor.clone() for name, tensor in load_file(final / "model.safetensors").items()}
    _flip_byte(final / "model.safetensors", offset=4096)
    second = train_once("second")
    log = (run_root / "logs" / "train-node0.log").read_text()
    assert f"skipping checkpoint {final}: model.safetensors does not match the sha256" in log, log[-3000:]
    assert "step-000006 at step 6" in log
    assert [Path(c).name for c in second["checkpoints"]] == ["step-000006", "step-000012"]
    resumed = load_file(final / "model.safetensors")
    assert all(expected[name].equal(resumed[name]) for name in expected)
    assert problem_of(final) is None
