"""Failure injection, for the tests of crash recovery.

Two recipe fields make a training run fail on purpose after an optimizer step:

- ``train.fail_at_step: K``: every rank raises :class:`InjectedFailure` after step ``K``;
- ``train.kill_rank_at_step: K``: the last rank SIGKILLs itself after step ``K`` (a dead peer:
  the others fail at their next collective, within the process-group timeout).

Each fires once per checkpoint root: when it fires it leaves a marker file there
(``.injected-fail-K``, ``.injected-kill-K``), so the retried or resumed run gets past it::

    faults = FailureInjection.arm(ckpt_root, recipe.train)   # at start, on every rank
    for step in ...:
        ...                                                   # train step `done`
        faults.after_step(done, rank, world)                  # may raise or kill
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path


class InjectedFailure(RuntimeError):
    """Raised by ``train.fail_at_step`` to test crash recovery."""


def failure_armed(root: Path, kind: str, step: int | None) -> bool:
    """Whether a failure injection should still fire: once per checkpoint root, so that a retried
    or resumed step gets past it. Read by every rank at start, before any rank can reach ``step``.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> failure_armed(root, "fail", 4), failure_armed(root, "fail", None)
    (True, False)
    >>> mark_failure_fired(root, "fail", 4)
    >>> failure_armed(root, "fail", 4), failure_armed(root, "kill", 4)
    (False, True)
    """
    return step is not None and not (root / f".injected-{kind}-{step}").exists()


def mark_failure_fired(root: Path, kind: str, step: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / f".injected-{kind}-{step}").touch()


@dataclass(frozen=True, slots=True)
class FailureInjection:
    """The injections of one run, armed (or not) when it started."""

    root: Path
    fail_at_step: int | None
    kill_rank_at_step: int | None
    fail_armed: bool
    kill_armed: bool

    @classmethod
    def arm(cls, root: Path, train_config) -> FailureInjection:
        """Read the markers under the checkpoint ``root`` now, before any rank trains a step (a rank
        that fires first writes its marker before the others would read it)."""
        t = train_config
        return cls(root=root, fail_at_step=t.fail_at_step, kill_rank_at_step=t.kill_rank_at_step,
                   fail_armed=failure_armed(root, "fail", t.fail_at_step),
                   kill_armed=failure_armed(root, "kill", t.kill_rank_at_step))

    def after_step(self, done: int, rank: int, world: int) -> None:
        """Fire what is armed for step ``done`` (1-based: the number of steps done)."""
        if self.fail_armed and done == self.fail_at_step:
            if rank == 0:
                mark_failure_fired(self.root, "fail", done)
            raise InjectedFailure(f"train.fail_at_step={self.fail_at_step}: injected failure after step {done}")
        if self.kill_armed and done == self.kill_rank_at_step and rank == world - 1:
            mark_failure_fired(self.root, "kill", done)
            # Under torchrun every line already carries "[rank N]" (see steps.launch).
            print(f"train.kill_rank_at_step={done}: rank {rank} kills itself (SIGKILL)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
