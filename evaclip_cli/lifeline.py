"""A job ends with the process that started it.

The chain of a local job: ``evaclip`` (the launcher; torchrun's elastic agent runs inside it) -> the ranks
(``python -m evaclip_cli.cli``, each in a session of its own) -> their data workers. With DeepSpeed's launcher:
``evaclip`` -> ``deepspeed.launcher.runner`` -> ``deepspeed.launcher.launch`` -> the ranks. Under slurm: the batch
script -> ``srun`` -> torchrun -> the ranks. If a process of this chain dies by any signal (SIGKILL included), nobody
tells its children; they would run to the end holding the run folder's lock. So:

* a child the launcher starts itself (DeepSpeed's runner) gets the parent-death signal before it execs
  (``preexec_die_with_parent``: ``prctl(PR_SET_PDEATHSIG)``, kept across exec);
* every rank sets it for itself when it starts (``watch_launcher``: the agent that started it is not our code),
  then checks right away that its parent is still the one it had (the parent may have died before the prctl), and
  polls the launcher (``EVACLIP_LAUNCHER``: host, pid and start time of the ``evaclip`` process, which may be a
  grandparent) from a thread twice a second; a rank whose launcher is gone kills its own process group (itself and
  its data workers) when it leads one, itself otherwise;
* a training data worker gets the parent-death signal too (``worker_dies_with_parent``, the DataLoader's
  ``worker_init_fn`` in ``data/wds.py``); torch's watchdog and ``eval/prefetch.py``'s thread poll as well.

SIGUSR1 is ignored by the launcher and, until the training loop installs its stop handler, by the ranks (an
ignored disposition is inherited across fork and exec): a SIGUSR1 sent to the whole job (slurm's warning before
the time limit) must stop it gracefully, never kill an agent. Linux only; elsewhere these are no-ops.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Optional

LAUNCHER_ENV = "EVACLIP_LAUNCHER"  # "host:pid:start" of the evaclip process that started the job
PR_SET_PDEATHSIG = 1
POLL_S = 0.5


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (the thread that started it) ends. Whether it
    could (Linux only)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def worker_dies_with_parent(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: the worker ends with its rank at once (SIGKILL), not at torch's next
    watchdog poll."""
    die_with_parent(signal.SIGKILL)


def preexec_die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when this process ends, and ignores
    SIGUSR1."""

    def setup() -> None:
        die_with_parent(sig)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    return setup


def _host() -> str:
    import socket

    return socket.gethostname()


def _start_time(pid: int) -> Optional[str]:
    """The start time of process ``pid`` (clock ticks since boot, /proc/PID/stat field 22), None if it is gone."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else None


def identity(pid: Optional[int] = None) -> str:
    """``host:pid:start`` of a process (this one by default): a PID reused by another process does not match."""
    pid = os.getpid() if pid is None else pid
    return f"{_host()}:{pid}:{_start_time(pid) or '?'}"


def alive(ident: str) -> bool:
    """Whether the process ``identity`` named still runs; True for one on another host (not checkable here)."""
    try:
        host, pid, start = ident.rsplit(":", 2)
        pid_n = int(pid)
    except ValueError:
        return True
    if host != _host():
        return True
    now = _start_time(pid_n)
    return now is not None and (start == "?" or now == start)


def launcher_env() -> dict[str, str]:
    """The variable that lets the ranks of a job this process starts watch it."""
    return {LAUNCHER_ENV: identity()}


def _end_job_here() -> None:
    """This rank's launcher is gone: end this process and, when it leads its process group (torchrun starts each
    rank in a session of its own), its data workers with it."""
    try:
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def watch_launcher(environ: Mapping[str, str] = os.environ, poll_s: float = POLL_S,
                   end: Callable[[], None] = _end_job_here) -> Optional[threading.Thread]:
    """At the start of a rank: die with the parent (the agent), check at once that it is still there, and poll
    the parent and the ``evaclip`` launcher from a daemon thread; ``end()`` when either is gone. Returns the
    thread (None when already ended)."""
    parent = os.getppid()
    die_with_parent(signal.SIGKILL)
    if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:  # the loop's stop handler replaces this
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    launcher = environ.get(LAUNCHER_ENV)

    def gone() -> bool:
        return os.getppid() != parent or (launcher is not None and not alive(launcher))

    if gone():
        end()
        return None

    def poll() -> None:
        while not gone():
            time.sleep(poll_s)
        end()

    t = threading.Thread(target=poll, name="evaclip-launcher-watch", daemon=True)
    t.start()
    return t
