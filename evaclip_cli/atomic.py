"""Nothing written half, nothing written twice at once.

* Every file and folder evaclip produces is written to a temporary sibling and renamed into place
  (``os.replace``): a crash or a kill leaves the old output or none, never a torn one. Temporary names carry the
  host and PID, and the next write into the same folder removes those of dead processes (a killed convert of an
  18B model leaves tens of GB otherwise).
* ``OutputLock``: an OS-level lock (``flock``) on a run folder or an output, held for the life of the process, so
  two runs cannot write one folder at once; the kernel drops it when the process dies, so a kill -9 never leaves
  it stale.
* Outputs get the user's umask (some writers create files 0600).

These helpers sit at the bottom of the package so every layer can use them.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import IO, Iterator, Optional, Union

from evaclip_cli.errors import UserError

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_permissions(path: PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the permissions any tool's output gets under the
    user's umask: some writers (safetensors) create files 0600, which teammates on shared storage cannot read."""
    path = Path(path)
    mask = _umask()
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in entries:
        if p.is_symlink():
            continue
        with contextlib.suppress(OSError):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def host_label() -> str:
    import socket

    return socket.gethostname().split(".")[0].replace("-", "_") or "host"


def _tmp_sibling(dst: Path, kind: str = "tmp") -> Path:
    return dst.parent / f".{dst.name}.{kind}-{host_label()}-{os.getpid()}"


def remove_stale_temporaries(folder: PathLike, notify=None) -> list[Path]:
    """Remove the temporary files/folders (``.NAME.tmp-HOST-PID``, ``.NAME.old-HOST-PID``) that processes of this
    host which no longer run left in ``folder``; ``notify(line)`` is told about each. Returns what was removed."""
    import re

    folder = Path(folder)
    pattern = re.compile(r"^\..+\.(tmp|old)-(?P<host>[^-/]+)-(?P<pid>\d+)$")
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    host = host_label()
    for p in entries:
        m = pattern.match(p.name)
        if not m or m.group("host") != host or process_alive(int(m.group("pid"))):
            continue
        try:
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError:
            continue
        removed.append(p)
        if notify is not None:
            notify(f"removed {p} ({size / 1e6:,.1f} MB), left by an evaclip process that no longer runs "
                   f"(pid {m.group('pid')})")
    return removed


def _stderr_note(line: str) -> None:
    import sys

    print(f"evaclip: {line}", file=sys.stderr)


@contextlib.contextmanager
def atomic_file(dst: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; on success it replaces ``dst``, on failure it is removed.

    ``with atomic_file(p) as tmp: torch.save(obj, tmp)``"""
    dst = Path(dst)
    tmp = _tmp_sibling(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {dst}: {cannot(e, dst)}") from None
    try:
        yield tmp
        default_permissions(tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(dst: PathLike, text: str) -> Path:
    """``dst`` holds ``text`` (UTF-8), written atomically."""
    with atomic_file(dst) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dst)


def write_json(dst: PathLike, obj, indent: int = 2) -> Path:
    import json

    return write_text(dst, json.dumps(obj, indent=indent) + "\n")


class AtomicDir:
    """Write a folder into ``.NAME.tmp-PID`` beside ``dst``; rename it into place on success, remove it on failure.

    ``with AtomicDir(out, force) as tmp: ...write files into tmp...``"""

    def __init__(self, dst: PathLike, force: bool, notify=_stderr_note):
        self.dst = Path(dst)
        self.force = force
        if self.dst.exists() and not force:
            raise UserError(f"{self.dst} exists; pass --force to replace it")
        self.tmp = _tmp_sibling(self.dst)
        self.notify = notify

    def __enter__(self) -> Path:
        try:
            self.dst.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.dst.parent, self.notify)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except OSError as e:
            raise UserError(f"cannot write {self.dst}: {cannot(e, self.tmp)}") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        default_permissions(self.tmp)
        old = None
        if self.dst.exists():
            old = _tmp_sibling(self.dst, "old")
            self.dst.rename(old)
        self.tmp.rename(self.dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        return False


# ----------------------------------------------------------------------------------------------------- locking
ORPHAN_WAIT_S = 30


def process_alive(pid) -> bool:
    """A running process (a zombie, ended but not yet reaped, is not: its locks and files are closed)."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class OutputLock:
    """An exclusive ``flock`` on ``lock_path``, which records who holds it (PID, host, start time) for the message a
    second process gets. Released by ``release()`` or when the process ends, however it ends.

    ``what`` names the thing locked in that message (e.g. the run folder)."""

    def __init__(self, lock_path: PathLike, what: PathLike):
        self.path, self.what = Path(lock_path), Path(what)
        self._fh: Optional[IO[str]] = None

    def acquire(self) -> "OutputLock":
        import fcntl
        import json
        import time

        orphan_deadline = None
        for _ in range(1000):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fh = open(self.path, "a+")
            except OSError as e:
                raise UserError(f"cannot write {self.what}: {cannot(e, self.path)}") from None
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                try:
                    who = json.loads(fh.read() or "{}")
                except ValueError:
                    who = {}
                fh.close()
                # the holder is dead but the lock is not: a process it forked (a data worker) inherited the lock and
                # is still winding down (a killed rank's workers notice within seconds): wait for it
                if who.get("host") == host_label() and not process_alive(who.get("pid")):
                    orphan_deadline = orphan_deadline or time.monotonic() + ORPHAN_WAIT_S
                    if time.monotonic() < orphan_deadline:
                        time.sleep(0.2)
                        continue
                holder = f"pid {who.get('pid', '?')} on {who.get('host', '?')}"
                if who.get("since"):
                    holder += f", since {who['since']}"
                if orphan_deadline:
                    raise UserError(f"{self.what} is still locked by processes {holder} started: it has ended, they "
                                    f"have not after {ORPHAN_WAIT_S} s (their command line names {self.what}); end "
                                    "them or choose another output") from None
                raise UserError(f"{self.what} is in use by another evaclip process ({holder}); wait for it to "
                                "finish or choose another output") from None
            try:  # the holder removes the file when it is done: make sure we locked the file that is there now
                same = os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()
        else:
            raise UserError(f"cannot lock {self.what}: its lock file keeps changing ({self.path})")
        try:
            fh.seek(0)
            fh.truncate()
            since = time.strftime("%Y-%m-%d %H:%M:%S")
            fh.write(json.dumps({"pid": os.getpid(), "host": host_label(), "since": since}))
            fh.flush()
        except OSError:  # a full disk: no lock file left behind
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            fh.close()
            raise
        self._fh = fh
        return self

    def release(self) -> None:
        """Drop the lock and remove its file (nothing is left beside the output)."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still holding it: a newcomer then locks a fresh file
            self._fh.close()  # closing the descriptor drops the flock
            self._fh = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_lock(run_dir: PathLike) -> OutputLock:
    """The lock of a training run folder: ``RUN/.evaclip.lock``."""
    return OutputLock(Path(run_dir) / ".evaclip.lock", run_dir)


def output_lock(dst: PathLike) -> OutputLock:
    """The lock of an output written whole (a converted folder, a push staging folder): ``.NAME.lock`` beside it,
    so the lock never lands inside the folder that is renamed into place."""
    dst = Path(dst)
    return OutputLock(dst.parent / f".{dst.name}.lock", dst)


def cannot(e: OSError, path: PathLike) -> str:
    """The reason of a failed write, for 'cannot write X: reason'."""
    import errno

    if e.errno == errno.ENOSPC:
        return f"no space left on the device holding {path}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied ({path} is read-only for this user)" if e.errno != errno.EROFS \
            else f"{path} is on a read-only file system"
    if e.errno == errno.EEXIST or e.errno == errno.ENOTDIR:
        return f"{_file_in_the_way(Path(path))} is a file, not a folder"
    if e.errno == errno.EISDIR:
        return f"{path} is a folder; name a file"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded on the device holding {path}"
    return f"{e.strerror or type(e).__name__} ({path})"


def write_failure(exc: BaseException, folder: PathLike) -> Optional[OSError]:
    """The OSError behind a failed write into ``folder``: ``exc`` itself when it is one. A writer that reports a
    failed write in its own words (torch's C++ zip writer inside ``torch.save`` and DeepSpeed checkpoints: "[enforce
    fail at inline_container.cc] unexpected pos", "file write failed") is diagnosed by a probe: 1 MiB written and
    synced into ``folder`` now fails the same way (a full disk, a quota, a read-only file system). None when the
    probe succeeds: the failure was not the disk's. Call it before removing what the failed write left."""
    if isinstance(exc, OSError):
        return exc
    probe = _tmp_sibling(Path(folder) / "evaclip-probe")
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * (1 << 20))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        return e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def _file_in_the_way(path: Path) -> Path:
    """The first of ``path`` and its parents that exists and is not a folder (``path`` itself when none is)."""
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            return p
    return path


def check_output(dst: PathLike, kind: str = "file") -> None:
    """Before any work: ``dst`` (``kind``: a "file", a "folder" written into, or "any": a file or folder that replaces
    whatever is there) can be created where it is named. No parent is a file, a file output is not an existing
    folder, a folder output not an existing file, and the nearest existing folder is writable."""
    dst = Path(dst)
    blocker = _file_in_the_way(dst.parent)
    if blocker.exists() and not blocker.is_dir():
        raise UserError(f"cannot write {dst}: {blocker} is a file, not a folder")
    if kind == "file" and dst.is_dir():
        raise UserError(f"cannot write {dst}: it is a folder; name a file (e.g. {dst / 'results.json'})")
    if kind == "folder" and dst.exists() and not dst.is_dir():
        raise UserError(f"cannot write {dst}: {dst} is a file, not a folder")
    here = next((p for p in (dst, *dst.parents) if p.is_dir()), None)
    if here is not None and not os.access(here, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {dst}: permission denied ({here} is read-only for this user)")


def check_apart(src: PathLike, dst: PathLike, verb: str) -> None:
    """Refuse, in one line, an output ``dst`` that is the source ``src``, lies inside it or contains it (symlinks
    resolved): writing it, with or without --force, would replace or change what is being read."""
    s, d = Path(src).resolve(), Path(dst).resolve()
    if d == s:
        how = "is the source itself"
    elif s in d.parents:
        how = "is inside the source"
    elif d in s.parents:
        how = "contains the source"
    else:
        return
    raise UserError(f"cannot {verb} {src} into {dst}: the output {how}, and writing it would replace or change the "
                    "files being read; choose an output outside it")
