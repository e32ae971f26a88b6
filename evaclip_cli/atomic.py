"""Nothing written half: every file and folder evaclip produces is written to a temporary sibling and renamed into
place (``os.replace``), so a crash or a kill leaves the old output or none, never a torn one.

The one helper for it (checkpoint exports, run metadata, eval results, Hub staging folders): it sits at the bottom
of the package so every layer can use it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Union

from evaclip_cli.errors import UserError

PathLike = Union[str, "os.PathLike[str]"]


def _tmp_sibling(dst: Path, kind: str = "tmp") -> Path:
    return dst.parent / f".{dst.name}.{kind}-{os.getpid()}"


@contextlib.contextmanager
def atomic_file(dst: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; on success it replaces ``dst``, on failure it is removed.

    ``with atomic_file(p) as tmp: torch.save(obj, tmp)``"""
    dst = Path(dst)
    tmp = _tmp_sibling(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {dst}: {e.strerror}") from None
    try:
        yield tmp
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

    def __init__(self, dst: PathLike, force: bool):
        self.dst = Path(dst)
        self.force = force
        if self.dst.exists() and not force:
            raise UserError(f"{self.dst} exists; pass --force to replace it")
        self.tmp = _tmp_sibling(self.dst)

    def __enter__(self) -> Path:
        try:
            self.dst.parent.mkdir(parents=True, exist_ok=True)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except OSError as e:
            raise UserError(f"cannot create {self.tmp} ({e.strerror})") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.dst.exists():
            old = _tmp_sibling(self.dst, "old")
            self.dst.rename(old)
        self.tmp.rename(self.dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        return False
