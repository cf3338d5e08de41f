"""Full-state checkpoints: weights (safetensors, HF format), optimizer, scheduler, data cursor, RNG.

Layout under a run's checkpoint root::

    checkpoints/
      step-000100/            complete: HF model folder + trainer state
        model.safetensors  config.json  tokenizer.json ...
        optimizer.pt  scheduler.pt  rng-rank0.pt ...
        trainer_state.json    written last: {"step": 100, "cursor": {...}, ...}
      .tmp-step-000200-1a2b/  a checkpoint being written (never picked by resume)

A checkpoint is written under a temporary name and renamed into place only when complete,
so a crash mid-write leaves nothing that :func:`latest_checkpoint` would return.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def begin(root: Path, step: int) -> Path:
    """Create and return the temporary folder for the checkpoint of ``step``."""
    tmp = root / f".tmp-{step_dir_name(step)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, step: int, trainer_state: dict) -> Path:
    """Write the trainer state last, then atomically publish ``tmp`` as ``step-NNNNNN``."""
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
    final = tmp.parent / step_dir_name(step)
    if final.exists():  # a re-run of the same step (resume after a crash past the rename)
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(roots: list[Path]) -> Path | None:
    """The complete checkpoint with the highest step over several roots (a run and its origins)."""
    best = None
    for root in roots:
        for ckpt in list_checkpoints(Path(root)):
            if best is None or checkpoint_step(ckpt) > checkpoint_step(best):
                best = ckpt
    return best


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def save_rng(folder: Path, rank: int) -> None:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, folder / f"rng-rank{rank}.pt")


def load_rng(folder: Path, rank: int) -> None:
    path = folder / f"rng-rank{rank}.pt"
    if not path.exists():  # resumed on more ranks than saved: keep the seeded state
        return
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


TRAINER_FILES = ("optimizer.pt", "scheduler.pt", STATE_FILE)


def model_files(path: Path) -> list[Path]:
    """The Hugging Face model + tokenizer files of a checkpoint (no optimizer, RNG or trainer state)."""
    return sorted(p for p in Path(path).iterdir()
                  if p.is_file() and p.name not in TRAINER_FILES and not p.name.startswith("rng-rank"))


def export_model(path: Path, dest: Path) -> Path:
    """Copy a checkpoint's model files into ``dest`` (a plain HF folder)."""
    dest.mkdir(parents=True, exist_ok=True)
    for file in model_files(path):
        shutil.copy2(file, dest / file.name)
    return dest


def remove_stale_temporaries(root: Path) -> None:
    """Delete half-written checkpoints left by a crash."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
