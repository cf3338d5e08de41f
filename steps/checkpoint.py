"""Full-state checkpoints: weights (safetensors, HF format), optimizer, scheduler, data cursor, RNG.

Layout under a run's checkpoint root::

    checkpoints/
      step-000100/            complete: HF model folder + trainer state
        model.safetensors  config.json  tokenizer.json ...
        optimizer.pt  scheduler.pt  rng-rank0.pt ...
        trainer_state.json    written last: {"step": 100, "train_curve": [...], "world_size": 2}
      step-000200/            finetune: lora -> the adapter instead of the full model:
        adapter_config.json  adapter_model.safetensors  tokenizer.json ...
      step-000300/            strategy: fsdp2 -> the optimizer state as DCP shards, one per rank:
        model.safetensors ...  optimizer/__0_0.distcp  optimizer/__1_0.distcp  optimizer/.metadata
      .tmp-step-000200-1a2b/  a checkpoint being written (never picked by resume)

A checkpoint is written under a temporary name and renamed into place only when complete,
so a crash mid-write leaves nothing that :func:`latest_checkpoint` would return. The step
number in the folder name is the data cursor: step ``K`` resumes with the rows of step ``K``.

``trainer_state.json`` also lists every other file of the checkpoint with its sha256 and size
(``files``). Resume verifies them (:func:`problem_of`): a truncated, corrupted or incomplete
latest checkpoint is skipped with a warning naming it and why, and the newest sound one is
used; when none is, the error names every candidate and its problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path

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
    """Write the trainer state last, with the checksum of every other file, then atomically
    publish ``tmp`` as ``step-NNNNNN``."""
    trainer_state = {**trainer_state, "files": file_checksums(tmp)}
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
    final = tmp.parent / step_dir_name(step)
    if final.exists():  # a re-run of the same step (resume after a crash past the rename)
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first.

    ``root`` may also be one checkpoint folder (then it is the only one) or a run root (its
    ``checkpoints/`` folder is searched), as ``train.resume_from`` allows.
    """
    root = Path(root)
    if _STEP_DIR.match(root.name) and (root / STATE_FILE).is_file():
        return [root]
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


class NoUsableCheckpoint(RuntimeError):
    """Checkpoints exist, but none is sound; the message names each and its problem."""


def latest_checkpoint(roots: list[Path]) -> Path | None:
    """The sound resumable checkpoint with the highest step over several roots (a run and its
    origins); None when there is no checkpoint at all.

    Checkpoints whose resume state :func:`prune` dropped (weights only) are passed over. A newer
    checkpoint with a problem (:func:`problem_of`) is skipped with a warning that names it.

    Raises:
        NoUsableCheckpoint: there are checkpoints, and every one has a problem.
    """
    candidates = sorted({ckpt.resolve() for root in roots for ckpt in list_checkpoints(Path(root))},
                        key=checkpoint_step, reverse=True)
    problems = []
    for ckpt in candidates:
        problem = problem_of(ckpt)
        if problem == _WEIGHTS_ONLY:
            continue
        if problem is None:
            return ckpt
        warnings.warn(f"skipping checkpoint {ckpt}: {problem}", stacklevel=2)
        problems.append(f"{ckpt}: {problem}")
    if problems:
        raise NoUsableCheckpoint("no checkpoint to resume from is sound:\n  " + "\n  ".join(problems))
    return None


_WEIGHTS_ONLY = "its resume state was pruned (weights only)"


def problem_of(path: Path) -> str | None:
    """Why a complete checkpoint cannot be resumed from, or None when it is sound.

    Its ``trainer_state.json`` must parse and every file it lists must be there with its size
    and sha256 (checkpoints written before the list existed need the trainer files and weights).
    """
    path = Path(path)
    try:
        state = read_state(path)
    except (OSError, ValueError) as error:
        return f"{STATE_FILE} is unreadable ({type(error).__name__}: {str(error)[:80]})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} has no step"
    if state.get("weights_only"):
        return _WEIGHTS_ONLY
    files = state.get("files")
    if files is None:  # written before checksums: check what resume needs is there
        has_optimizer = any((path / name).exists() for name in ("optimizer.pt", "optimizer", DEEPSPEED_DIR))
        missing = ([] if has_optimizer else ["the optimizer state"]) + \
            ([] if (path / "scheduler.pt").is_file() else ["scheduler.pt"]) + \
            ([] if any(p.suffix == ".safetensors" for p in model_files(path)) else ["the model weights"])
        return f"missing {', '.join(missing)}" if missing else None
    for relpath, expected in sorted(files.items()):
        target = path / relpath
        if ".." in Path(relpath).parts or Path(relpath).is_absolute():
            return f"{STATE_FILE} lists a path outside the checkpoint: {relpath!r}"
        if not target.is_file():
            return f"{relpath} is missing"
        if target.stat().st_size != expected.get("bytes"):
            return f"{relpath} has {target.stat().st_size} bytes, {expected.get('bytes')} were written (truncated?)"
        if _sha256(target) != expected.get("sha256"):
            return f"{relpath} does not match the sha256 written with it (corrupted)"
    return None


def file_checksums(folder: Path) -> dict[str, dict]:
    """``{relpath: {"sha256", "bytes"}}`` of every file under ``folder`` but the trainer state."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE_FILE
            and not p.name.startswith(f".{STATE_FILE}.")}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as reader:
        while chunk := reader.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def is_resumable(path: Path) -> bool:
    """Whether a complete checkpoint still holds its resume state (see :func:`prune`)."""
    return not read_state(path).get("weights_only", False)


def save_rng(folder: Path, rank: int) -> None:
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, folder / f"rng-rank{rank}.pt")


def load_rng(folder: Path, rank: int) -> None:
    import torch

    path = folder / f"rng-rank{rank}.pt"
    if not path.exists():  # resumed on more ranks than saved: keep the seeded state
        return
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


TRAINER_FILES = ("optimizer.pt", "scheduler.pt", STATE_FILE)
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: Path) -> bool:
    """Whether a checkpoint holds a LoRA adapter (``finetune: lora``) rather than a full model."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def save_weights(model, folder: Path, *, is_writer: bool, layout: str = "full",
                 real_vocab: int | None = None) -> None:
    """Write the model as a Hugging Face folder (safetensors): the adapter only for a peft model.

    Under FSDP2 and DeepSpeed (``layout``) every rank must call this: the full state dict is
    gathered (to CPU under FSDP2), and only the writer (rank 0) saves it. A model trained with a
    padded vocabulary (``train.pad_vocab_multiple``) is saved at ``real_vocab`` rows.
    """
    if layout == "deepspeed":
        import deepspeed

        # Under ZeRO-3 the parameters are partitioned: gather them for the save (a no-op for ZeRO-2).
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if is_writer:
                full = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                _save_pretrained(model, folder, _without_tied_aliases(model, full), real_vocab)
        return
    state_dict = None
    if layout == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                          cpu_offload=True))
        state_dict = _without_tied_aliases(model, state_dict)
    if is_writer:
        _save_pretrained(model, folder, state_dict, real_vocab)


def _save_pretrained(model, folder: Path, state_dict: dict | None, real_vocab: int | None) -> None:
    """``save_pretrained``, cutting the embedding and LM head back to ``real_vocab`` rows."""
    from steps.models import save_model

    embed = model.get_input_embeddings().weight
    padded = embed.shape[0]
    if real_vocab is None or padded == real_vocab:
        save_model(model, folder, state_dict)
        return
    if state_dict is None:
        state_dict = _without_tied_aliases(model, {k: v.detach() for k, v in model.state_dict().items()})
    head = model.get_output_embeddings()
    vocab_params = {id(embed)} | ({id(head.weight)} if head is not None else set())
    vocab_names = {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in vocab_params}
    state_dict = {k: v[:real_vocab] if k in vocab_names else v for k, v in state_dict.items()}
    model.config.vocab_size = real_vocab
    try:
        save_model(model, folder, state_dict)
    finally:
        model.config.vocab_size = padded


def _without_tied_aliases(model, state_dict: dict) -> dict:
    """A gathered state dict holds tied weights (lm_head = embed_tokens) twice, as separate
    tensors; keep one name of each parameter, as save_pretrained does for a plain model."""
    unique = {name for name, _ in model.named_parameters()}
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique
    return {k: v for k, v in state_dict.items() if k not in aliases}


def load_weights(model, folder: Path) -> None:
    """Load a checkpoint's weights (full model or adapter) into an unwrapped model, strictly."""
    from safetensors.torch import load_file

    if is_adapter(folder):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(Path(folder) / "adapter_model.safetensors")))
        if result.unexpected_keys:
            raise RuntimeError(f"adapter {folder} does not match the model: unexpected {result.unexpected_keys}")
        return
    if hasattr(model, "peft_config"):
        raise RuntimeError(f"checkpoint {folder} holds a full model, but train.finetune is lora")
    missing, unexpected = model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")), strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match the model: missing "
                           f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")


def save_optimizer(model, optimizer, folder: Path, *, is_writer: bool, sharded: bool) -> None:
    """``optimizer.pt`` from the writer, or (``sharded``, FSDP2) each rank's shard via torch DCP."""
    import torch

    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(folder / "optimizer"))
    elif is_writer:
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")


def load_optimizer(model, optimizer, folder: Path, *, sharded: bool, device) -> None:
    """Restore what :func:`save_optimizer` wrote (DCP reshards to the current world size)."""
    import torch

    if not sharded:
        optimizer.load_state_dict(torch.load(Path(folder) / "optimizer.pt", weights_only=True, map_location=device))
        return
    if not (Path(folder) / "optimizer").is_dir():
        raise RuntimeError(f"checkpoint {folder} has no sharded optimizer state (saved by another strategy?)")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(Path(folder) / "optimizer"))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


DEEPSPEED_DIR = "deepspeed"


def save_deepspeed(engine, folder: Path) -> None:
    """DeepSpeed's own checkpoint (module, per-rank ZeRO optimizer partitions, LR scheduler) under
    ``folder/deepspeed``; every rank must call this."""
    engine.save_checkpoint(str(folder), tag=DEEPSPEED_DIR, save_latest=False)


def load_deepspeed(engine, folder: Path) -> None:
    """Restore what :func:`save_deepspeed` wrote, optimizer and scheduler included."""
    if not (Path(folder) / DEEPSPEED_DIR).is_dir():
        raise RuntimeError(f"checkpoint {folder} has no DeepSpeed state (saved by another strategy?)")
    load_path, _ = engine.load_checkpoint(str(folder), tag=DEEPSPEED_DIR, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder / DEEPSPEED_DIR}")


def prune(root: Path, keep_last: int, needed: set[str] = frozenset(), *, keep_weights: bool = False
          ) -> list[Path]:
    """Retention: only the newest ``keep_last`` checkpoints stay resumable (0 keeps all whole).

    Older ones named in ``needed`` (folder names such as ``step-000100``) stay whole. The rest
    are deleted, or, with ``keep_weights`` (the trainer's choice: every flow evaluates every
    checkpoint after training), lose only their resume state: optimizer (one file, DCP shards or
    DeepSpeed's partitions), scheduler and RNG files, 2-3x the size of the weights. Their model
    files and ``trainer_state.json`` (then marked ``weights_only``) stay for evaluation, and
    :func:`latest_checkpoint` no longer picks them. The mark is written before anything is
    deleted, so a crash midway never leaves a "resumable" checkpoint without its state. Returns
    the checkpoints deleted or stripped now.

        >>> # step-000010 .. step-000040 exist; prune(root, 2) deletes step-000010 and step-000020
    """
    if keep_last <= 0:
        return []
    ckpts = list_checkpoints(Path(root))
    doomed = [p for p in ckpts[:-keep_last] if p.name not in needed and is_resumable(p)]
    for p in doomed:
        if not keep_weights:
            shutil.rmtree(p, ignore_errors=True)
            continue
        state = {**read_state(p), "weights_only": True}
        dropped = {item.relative_to(p).as_posix() for item in resume_state_files(p)}
        if "files" in state:  # the weights stay listed (and checked); the dropped state does not
            state["files"] = {rel: entry for rel, entry in state["files"].items()
                              if not any(rel == d or rel.startswith(d + "/") for d in dropped)}
        marked = p / f".{STATE_FILE}.{uuid.uuid4().hex[:8]}"
        marked.write_text(json.dumps(state, indent=1))
        os.replace(marked, p / STATE_FILE)
        for item in resume_state_files(p):
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    return doomed


def resume_state_files(path: Path) -> list[Path]:
    """What a checkpoint holds only to resume training: optimizer, scheduler and RNG state."""
    path = Path(path)
    names = ("optimizer.pt", "optimizer", "scheduler.pt", DEEPSPEED_DIR)
    return sorted([path / n for n in names if (path / n).exists()] + list(path.glob("rng-rank*.pt")))


def model_files(path: Path) -> list[Path]:
    """The Hugging Face model + tokenizer files of a checkpoint (no optimizer, RNG or trainer state)."""
    return sorted(p for p in Path(path).iterdir()
                  if p.is_file() and p.name not in TRAINER_FILES and not p.name.startswith("rng-rank"))


def export_model(path: Path, dest: Path) -> Path:
    """Copy a checkpoint's model files into ``dest`` (a plain HF folder).

    A LoRA checkpoint is merged into its base model first (peft ``merge_and_unload``), so the
    exported folder is a plain model that loads without peft.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if is_adapter(path):
        return _export_merged(Path(path), dest)
    for file in model_files(path):
        shutil.copy2(file, dest / file.name)
    return dest


def _export_merged(path: Path, dest: Path) -> Path:
    from peft import PeftModel

    from steps.models import load_model, save_model

    base_path = json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    merged = PeftModel.from_pretrained(load_model(base_path), str(path)).merge_and_unload()
    save_model(merged, dest)
    for file in model_files(path):
        if not file.name.startswith(("adapter_", "README")):
            shutil.copy2(file, dest / file.name)
    return dest


def remove_stale_temporaries(root: Path) -> None:
    """Delete half-written checkpoints left by a crash."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
