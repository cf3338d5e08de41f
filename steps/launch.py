"""The launcher side of training: what a Metaflow node of the ``train`` step runs (torch-free).

:func:`run_node` writes the node's :class:`TrainSpec` and calls :func:`launch`, which runs::

    python -m torch.distributed.run --nnodes N --node_rank I --master_addr A --master_port P \\
        --nproc_per_node G -m steps.train --spec train_spec.json

and every rank then runs ``steps.train.main``. This module imports neither torch nor
transformers, so the task that only starts torchrun and waits does not spend seconds importing
them (the ranks do).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from steps import checkpoint
from steps.config import Recipe, recipe_to_dict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
COLLECTIVE_TIMEOUT_S = 60


@dataclass(kw_only=True, slots=True)
class TrainSpec:
    """What a train launch needs; written as JSON next to the checkpoints."""

    recipe: dict
    base_model: str
    token_uris: list[str]
    checkpoint_root: str
    resume_roots: list[str]
    pad_id: int | None = None
    """The padding token id; None: the ranks take their tokenizer's."""
    objective: str = "sft"
    """What the loss is: a name in ``steps.objectives.OBJECTIVES``."""
    objective_inputs: dict = field(default_factory=dict)
    """What that objective needs besides the model and the token shards (a teacher path, ...)."""

    @classmethod
    def read(cls, path: str | Path) -> TrainSpec:
        return cls(**json.loads(Path(path).read_text()))

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({k: getattr(self, k) for k in self.__slots__}, indent=1))


def master_port_for(run_key: str) -> int:
    """A rendezvous port that every node of one run derives alike, without talking first."""
    return 20000 + zlib.crc32(run_key.encode()) % 20000


def launch(spec_path: Path, *, num_nodes: int, node_rank: int, nproc_per_node: int,
           master_addr: str, master_port: int, log_path: Path | None = None,
           rendezvous_timeout_s: int = 300) -> None:
    """Run torchrun for this node and stream its output; raise, naming the rank, if any failed.

    Every line a worker prints is prefixed ``[rank N]`` (its global rank) and also kept in
    per-rank files under ``<log_path's folder>/ranks-node<I>/``; the node's whole output goes to
    ``log_path``. A dead rank makes torchrun stop the others on this node at once; ranks on other
    nodes fail at their next collective, within the process group timeout (60 s). With several
    nodes, a node that never joins fails the others after ``rendezvous_timeout_s``.
    """
    if num_nodes == 1:  # one node: let torchrun pick a free local port
        rendezvous = ["--standalone"]
    else:
        # torchrun's static rendezvous waits `timeout` for every node's agent (900 s by default);
        # `join_timeout` bounds the workers' own join.
        rendezvous = [f"--nnodes={num_nodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                      f"--master_port={master_port}",
                      f"--rdzv_conf=join_timeout={COLLECTIVE_TIMEOUT_S},timeout={rendezvous_timeout_s}"]
    rank_logs = ["--tee=3"]  # workers' stdout and stderr go to per-rank files and to the console
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        rank_logs.append(f"--log-dir={Path(log_path).parent / f'ranks-node{node_rank}'}")
    cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous,
           f"--nproc_per_node={nproc_per_node}", "--max_restarts=0", "--monitor-interval=0.5", *rank_logs,
           "-m", "steps.train", "--spec", str(spec_path)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")  # the trainer sets its own thread count per rank
    env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] = "[rank ${rank}] "
    print(f"[node {node_rank}] launching: {' '.join(cmd)}", flush=True)
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    failures = FailureSummary()
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=str(PROJECT_ROOT), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            if not line.startswith("[rank "):
                line = f"[node {node_rank}] {line}"  # torchrun's own lines
            print(line, end="", flush=True)
            if log:
                log.write(line)
            failures.feed(line)
        returncode = proc.wait()
    finally:
        if log:
            log.close()
    if returncode != 0:
        detail = failures.text() or "see the log above"
        raise RuntimeError(f"torchrun on node {node_rank} exited with code {returncode}: {detail}")


class FailureSummary:
    """Collects, from torchrun's output, which ranks died and how, for the step's error message.

    It keeps each rank's own ``FAILED`` line and torchrun's end-of-run table, root cause first::

        >>> summary = FailureSummary()
        >>> for line in ["Failures:", "  rank      : 0 (local_rank: 0)", "  exitcode  : -15 (pid: 7)  (SIGTERM)",
        ...              "Root Cause (first observed failure):", "  rank      : 1 (local_rank: 1)",
        ...              "  exitcode  : -9 (pid: 8)  (SIGKILL)"]:
        ...     summary.feed(line)
        >>> summary.text()
        'rank 1 (local_rank 1) exited with -9 (SIGKILL) [root cause]; rank 0 (local_rank 0) exited with -15 (SIGTERM)'
    """

    _RANK = re.compile(r"^\s*rank\s*:\s*(\d+) \(local_rank: (\d+)\)")
    _RENDEZVOUS = re.compile(r"Timed out after (\d+) seconds waiting for clients\. (\d+)/(\d+) clients joined")
    _EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+).*?(?:\((SIG\w+)\))?\s*$")

    def __init__(self) -> None:
        self.rank_errors: list[str] = []
        self.deaths: list[str] = []
        self._root_cause, self._rank = False, None

    def feed(self, line: str) -> None:
        if " FAILED: " in line:  # the trainer's own "rank N FAILED: ..." (after the "[rank N] " prefix)
            self.rank_errors.append(line.split("] ", 1)[-1].strip() if line.startswith("[rank ") else line.strip())
            return
        text = line.split("] ", 1)[-1] if line.startswith("[node ") else line
        if match := self._RENDEZVOUS.search(text):
            self.rank_errors.append(
                f"rendezvous timed out after {match.group(1)} s: {match.group(2)} of {match.group(3)} nodes joined "
                "(a node failed before training started: see its task's log; train.rendezvous_timeout_s)")
        elif text.startswith("Root Cause"):
            self._root_cause = True
        elif match := self._RANK.match(text):
            self._rank = f"rank {match.group(1)} (local_rank {match.group(2)})"
        elif (match := self._EXIT.match(text)) and self._rank:
            how = f" ({match.group(2)})" if match.group(2) else ""
            entry = f"{self._rank} exited with {match.group(1)}{how}"
            if self._root_cause:
                self.deaths.insert(0, entry + " [root cause]")
            elif entry not in self.deaths:
                self.deaths.append(entry)
            self._rank = None

    def text(self) -> str:
        deaths = list(dict.fromkeys(self.deaths))
        root = {d.removesuffix(" [root cause]") for d in deaths if d.endswith("[root cause]")}
        deaths = [d for d in deaths if d not in root]
        return "; ".join(deaths + self.rank_errors)


def resume_roots_for(recipe: Recipe, origin_run_root: str | None = None) -> list[str]:
    """Where a train step looks for checkpoints besides its own run: the origin run of a
    ``resume`` and ``train.resume_from`` (a checkpoint, a checkpoint root or a run root)."""
    roots = []
    if origin_run_root:
        roots.append(str(Path(origin_run_root) / "checkpoints"))
    if recipe.train.resume_from:
        roots.append(recipe.train.resume_from)
    return roots


def run_node(recipe: Recipe, base_model: str, token_stats: dict, run_root: str, *, node_index: int,
             num_nodes: int, main_ip: str, run_key: str, resume_roots: list[str] | None = None,
             objective: str = "sft", objective_inputs: dict | None = None) -> dict:
    """One Metaflow node of the train step: write the spec, run torchrun, report rank 0's results.

    Checkpoints of a run live in ``<run_root>/checkpoints``; a restarted step (``@retry``)
    finds them there and continues from the latest complete one. ``resume_roots`` (see
    :func:`resume_roots_for`) are searched too, and the latest checkpoint over all of them wins.
    ``objective`` names the loss (``steps.objectives``); ``objective_inputs`` is passed to it.
    """
    ckpt_root = Path(run_root) / "checkpoints"
    logs = Path(run_root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec = TrainSpec(recipe=recipe_to_dict(recipe), base_model=str(base_model),
                     token_uris=token_stats["train"]["uris"], checkpoint_root=str(ckpt_root),
                     resume_roots=list(resume_roots or []),
                     objective=objective, objective_inputs=dict(objective_inputs or {}))
    spec_path = logs / f"train_spec-node{node_index}.json"
    spec.write(spec_path)
    launch(spec_path, num_nodes=num_nodes, node_rank=node_index, nproc_per_node=recipe.train.nproc_per_node,
           master_addr=main_ip if num_nodes > 1 else "127.0.0.1",
           master_port=master_port_for(run_key), log_path=logs / f"train-node{node_index}.log",
           rendezvous_timeout_s=recipe.train.rendezvous_timeout_s)
    ckpts = checkpoint.list_checkpoints(ckpt_root)
    if not ckpts:
        raise RuntimeError(f"training finished but wrote no checkpoint under {ckpt_root}")
    return {"checkpoints": [str(p) for p in ckpts],
            "train_curve": checkpoint.read_state(ckpts[-1])["train_curve"]}
