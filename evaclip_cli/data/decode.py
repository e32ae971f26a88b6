"""Decoding a video safely: container checks that keep decord from crashing the process, frame sampling, and
``read_clip`` (decord, one thread). Used by the training streams (``data/video.py``), ``data inspect``
(``data/wds.py``) and the video eval sets.
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Callable, Optional, Sequence

from evaclip_cli.errors import first_line


class VideoError(Exception):
    """A clip that cannot be used: unreadable container or stream, no frames."""


# ------------------------------------------------------------------------------------------------------ sampling
def frame_indices(n: int, frames: int, mode: str = "uniform", rng: Optional[random.Random] = None) -> list[int]:
    """Frame numbers to decode from a clip of ``n`` frames.

    ``uniform``: the centres of ``frames`` equal segments; ``jitter``: a random frame inside each segment (``rng``);
    ``middle``: the middle frame only (the paper's single-frame protocol). Clips shorter than ``frames`` repeat
    frames, so every clip yields the same count."""
    if n <= 0:
        raise VideoError("the video has no frames")
    if mode == "middle":
        return [n // 2]
    if frames <= 0:
        raise ValueError("frames must be positive")
    seg = n / frames
    if mode == "jitter":
        rng = rng or random.Random()
        return [min(n - 1, int(seg * i + rng.random() * seg)) for i in range(frames)]
    if mode == "uniform":
        return [min(n - 1, int(seg * (i + 0.5))) for i in range(frames)]
    raise ValueError(f"unknown sampling mode {mode!r}")


# ------------------------------------------------------------------------------------------------------ decoding
def check_container(head: bytes, size: int, tail: Optional[bytes] = None) -> None:
    """Structural checks decord needs before it is safe to open a file: its FFmpeg AVI path crashes the process
    (SIGSEGV, not an exception) on a truncated AVI or one without an ``idx1`` index, so those are refused here, and
    MP4 boxes that run past the end of the file (a cut download) are reported as such. ``head``: the first bytes
    (64 KiB is enough), ``tail``: the last bytes (AVI keeps its index there; default: ``head``), ``size``: the
    file's length."""
    import struct

    if size == 0:
        raise VideoError("empty file")
    tail = head if tail is None else tail
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        declared = struct.unpack("<I", head[4:8])[0] + 8
        if declared > size:
            raise VideoError(f"truncated AVI ({size} of {declared} bytes)")
        if b"idx1" not in tail:
            raise VideoError("AVI without an idx1 index (not supported by the decoder)")
    elif head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):  # ISO media (mp4/mov)
        pos = 0
        while pos + 8 <= len(head):
            box = struct.unpack(">I", head[pos:pos + 4])[0]
            if box == 1 and pos + 16 <= len(head):
                box = struct.unpack(">Q", head[pos + 8:pos + 16])[0]
            elif box == 0:  # to the end of the file
                break
            if box < 8 or pos + box > size:
                raise VideoError(f"truncated or damaged MP4 (the box at byte {pos} runs past the end)")
            pos += box


def read_clip(src, pick: Callable[[int], Sequence[int]]):
    """Decode the frames ``pick(n_frames)`` of a video (a path or the file's bytes) with decord: uint8 array
    [T, H, W, 3]. Raises VideoError for anything that is not a readable, non-empty video."""
    import decord

    decord.bridge.set_bridge("native")
    if isinstance(src, (str, Path)):
        try:
            size = Path(src).stat().st_size
            with open(src, "rb") as fh:
                head = fh.read(1 << 16)
                fh.seek(max(0, size - (1 << 20)))
                tail = fh.read() if head[:4] == b"RIFF" else None
        except OSError as e:
            raise VideoError(f"cannot read ({e.strerror})") from None
        check_container(head, size, tail)
    else:
        check_container(src[:1 << 16], len(src), src[-(1 << 20):])
    try:
        source = str(src) if isinstance(src, (str, Path)) else io.BytesIO(src)
        vr = decord.VideoReader(source, ctx=decord.cpu(0), num_threads=1)
    except Exception as e:  # DECORDError, RuntimeError, ...: not a video decord can open
        raise VideoError(f"cannot open: {first_line(e)}") from None
    try:
        n = len(vr)
        idx = list(pick(n))
        frames = vr.get_batch(idx).asnumpy()
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(f"cannot decode: {first_line(e)}") from None
    if frames.ndim != 4 or frames.shape[0] != len(idx) or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise VideoError(f"decoded {tuple(frames.shape)} for {len(idx)} frames")
    return frames
