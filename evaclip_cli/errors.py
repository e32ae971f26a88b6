"""One error type for everything the user can fix: printed as one line, exit code 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input: the message says what, where and what to do. Never shown with a traceback."""

    exit_code = 2


class TrainingStopped(Exception):
    """A run that cannot go on (e.g. too many non-finite losses in a row): one line, exit code 3."""

    exit_code = 3
    every_node = False  # printed by global rank 0 only


class PeerLost(TrainingStopped):
    """Another process of the job died or stopped answering (a node lost mid-step): the survivors stop with one
    line each node (global rank 0 may be the one that died)."""

    every_node = True


class Interrupted(TrainingStopped):
    """Ctrl-C (SIGINT) while training: one line naming the last complete checkpoint, exit code 130."""

    exit_code = 130


class StopRequested(Exception):
    """A graceful stop asked for by a signal (``compute.stop_signals``: SIGTERM, SIGUSR1; slurm's warning before the
    time limit): every rank finished the same step and a checkpoint of it was written. One line, exit code 75
    (EX_TEMPFAIL: "try again"), the code the sbatch script requeues on."""

    exit_code = 75


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line for a message: its first line, or its type when it has no text."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
