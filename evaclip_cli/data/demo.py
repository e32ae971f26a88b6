"""The embedded demo dataset: procedural images with captions, deterministic, no download.

Each image is one shape (8 kinds) in one colour (8 named colours), at a random size, position and rotation, on a
random gradient/textured background with mild noise. Captions come from varied templates and sometimes mention
size or position. Written in the layout img2dataset writes (``KEY.jpg`` + ``KEY.txt`` + ``KEY.json`` in tar
shards), plus ImageFolder zero-shot sets (shapes, colours) built from held-out seeds.

Videos (for ``evaclip finetune-video``): one shape in one colour doing one of five motions over 16 frames
(``MOTIONS``: sliding sideways, changing colour, blinking, growing and shrinking, standing still). A single frame
of a colour-changing clip looks like a one-colour shape standing still, and the middle frame of a blinking clip may
show nothing; several frames tell them apart. Written as Motion-JPEG AVI files (a real container and codec that
decord/FFmpeg read; the writer is a few lines of RIFF, so no video encoder is needed at run time): ``video_train/``
shards (``KEY.avi`` + ``KEY.txt`` + ``KEY.json``), ``video_val.csv`` (a ``path,caption`` manifest for retrieval)
and zero-shot folders ``zeroshot_video/{motion,colors}/test/<class>/*.avi`` from held-out seeds.
"""
from __future__ import annotations

import csv
import io
import json
import math
import random
import shutil
import tarfile
import time
from pathlib import Path

VERSION = 4
DEMO_DIR_ENV = "EVACLIP_DEMO_DIR"


def demo_dir() -> Path:
    """Where the training stages find (and make, on first use) the demo data: $EVACLIP_DEMO_DIR or ./demo_data."""
    import os

    return Path(os.environ.get(DEMO_DIR_ENV, "demo_data"))


SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart"]
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
TEMPLATES = [
    "a photo of a {color} {shape}.", "a {color} {shape}.", "a {size} {color} {shape}.",
    "a {color} {shape} on a {bg} background.", "a drawing of a {shape} in {color}.",
    "a {color} {shape} {where}.", "the {shape} is {color}.", "an image showing a {size} {color} {shape}.",
]
# captions that name only the shape: colour alone cannot explain these pairs, so the image tower has to see shape
SHAPE_ONLY = ["a photo of a {shape}.", "a {size} {shape}.", "a {shape} {where}.", "a drawing of a {shape}.",
              "a {shape} on a {bg} background."]
ZS_TEMPLATES = {
    "shapes": ["a photo of a {c}.", "a {c}.", "a drawing of a {c}.", "an image of a {c} shape."],
    "colors": ["something {c}.", "a {c} shape.", "a photo of something {c}.", "a {c} object."],
}
SHARD_SIZE = 500


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float):
    def pts(n, radii):
        return [(cx + radii[i % len(radii)] * math.cos(rot + 2 * math.pi * i / n),
                 cy + radii[i % len(radii)] * math.sin(rot + 2 * math.pi * i / n)) for i in range(n)]

    if shape == "square":
        return pts(4, [r * 1.2])
    if shape == "triangle":
        return pts(3, [r * 1.25])
    if shape == "diamond":
        return pts(4, [r * 1.3, r * 0.75])
    if shape == "star":
        return pts(10, [r * 1.3, r * 0.55])
    if shape == "cross":
        a, b = r * 1.1, r * 0.38
        base = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
                (-b, -b)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    if shape == "heart":
        out = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            out.append((cx + x * r / 15, cy + y * r / 15))
        return out
    raise ValueError(shape)


def render(rng: random.Random, size: int):
    """One sample: (PIL image, caption, metadata)."""
    from PIL import Image, ImageDraw

    shape = rng.choice(SHAPES)
    color = rng.choice(list(COLORS))
    fg = COLORS[color]
    dark = rng.random() < 0.5
    base = [rng.randint(10, 90) if dark else rng.randint(160, 235) for _ in range(3)]
    if color in ("white", "yellow") and not dark:
        base = [rng.randint(10, 90) for _ in range(3)]
        dark = True
    if color == "black" and dark:
        base = [rng.randint(160, 235) for _ in range(3)]
        dark = False
    img = Image.new("RGB", (size, size), tuple(base))
    d = ImageDraw.Draw(img)
    # gradient / stripes background texture
    for y in range(0, size, 4):
        shade = int(18 * math.sin(y / size * math.pi * rng.uniform(0.5, 3)))
        d.rectangle([0, y, size, y + 3], fill=tuple(max(0, min(255, c + shade)) for c in base))
    scale = rng.choice(["small", "large"])
    r = size * (rng.uniform(0.17, 0.22) if scale == "small" else rng.uniform(0.27, 0.34))
    cx, cy = rng.uniform(r * 1.3, size - r * 1.3), rng.uniform(r * 1.3, size - r * 1.3)
    # upright give or take 20 degrees: a square stays a square, not a diamond
    rot = rng.uniform(-0.35, 0.35) + {"triangle": -math.pi / 2, "star": -math.pi / 2, "diamond": -math.pi / 2,
                                       "square": math.pi / 4}.get(shape, 0.0)
    jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in fg)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=jitter, width=max(2, int(r * 0.35)))
    else:
        d.polygon(_polygon(shape, cx, cy, r, rot), fill=jitter)
    # mild noise: a few random pixels
    px = img.load()
    for _ in range(size * size // 40):
        x, y = rng.randrange(size), rng.randrange(size)
        c = px[x, y]
        px[x, y] = tuple(max(0, min(255, v + rng.randint(-30, 30))) for v in c)
    vert = "top" if cy < size / 3 else "bottom" if cy > 2 * size / 3 else "middle"
    horiz = "left" if cx < size / 3 else "right" if cx > 2 * size / 3 else "center"
    if (vert, horiz) == ("middle", "center"):
        where = "in the center"
    elif vert == "middle":
        where = f"on the {horiz}"
    elif horiz == "center":
        where = f"at the {vert}"
    else:
        where = f"in the {vert} {horiz} corner"
    template = rng.choice(SHAPE_ONLY if rng.random() < 0.4 else TEMPLATES)
    if color == "orange":
        template = template.replace("a {color}", "an {color}")
    caption = template.format(color=color, shape=shape, size=scale, bg="dark" if dark else "light",
                                           where=where)
    return img, caption, {"shape": shape, "color": color, "size": scale, "where": where}


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, optimize=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_shards(folder: Path, n: int, seed: int, size: int, prefix: str) -> int:
    folder.mkdir(parents=True)
    written = 0
    for shard in range(math.ceil(n / SHARD_SIZE)):
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(shard * SHARD_SIZE, min(n, (shard + 1) * SHARD_SIZE)):
                rng = random.Random(f"{seed}-{prefix}-{i}")
                img, caption, meta = render(rng, size)
                key = f"{prefix}{i:07d}"
                _add(tar, f"{key}.jpg", _jpeg(img))
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "caption": caption, **meta}).encode())
                written += 1
    return written


def _write_zeroshot(root: Path, per_class: int, seed: int, size: int) -> dict:
    out = {}
    for task, classes in (("shapes", SHAPES), ("colors", list(COLORS))):
        folder = root / task
        counts = {c: 0 for c in classes}
        i = 0
        while min(counts.values()) < per_class:
            rng = random.Random(f"{seed}-zs-{task}-{i}")
            img, _, meta = render(rng, size)
            label = meta["shape" if task == "shapes" else "color"]
            i += 1
            if counts[label] >= per_class:
                continue
            d = folder / "test" / label
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{counts[label]:04d}.jpg").write_bytes(_jpeg(img))
            counts[label] += 1
        (folder / "classnames.txt").write_text("".join(c + "\n" for c in sorted(classes)))
        (folder / "templates.txt").write_text("".join(t + "\n" for t in ZS_TEMPLATES[task]))
        out[task] = {"classes": sorted(classes), "per_class": per_class}
    return out


# ------------------------------------------------------------------------------------------------------- videos
MOTIONS = {  # folder name -> class name used in captions and zero-shot prompts
    "sideways": "sliding sideways", "colors": "changing colour", "blinking": "blinking",
    "pulsing": "growing and shrinking", "still": "standing still",
}
VIDEO_TEMPLATES = [
    "a {color} {shape} {motion}.", "a video of a {color} {shape} {motion}.", "a {size} {color} {shape} {motion}.",
    "a {color} {shape} {motion} on a {bg} background.", "a clip of a {shape} in {color}, {motion}.",
    "a {shape} {motion}.", "something {color} {motion}.",
]
# captions that name only the motion: colour and shape cannot explain these pairs, so the clip embedding has to
# carry the motion
MOTION_ONLY = ["a video of something {motion}.", "a shape {motion}.", "an object {motion}.", "something {motion}.",
               "a clip of a shape {motion}."]
ZS_VIDEO_TEMPLATES = {
    "motion": ["a video of a shape {c}.", "a shape {c}.", "something {c}.", "a clip of an object {c}."],
    "colors": ["a video of something {c}.", "a {c} shape.", "something {c}.", "a {c} object."],
}
VIDEO_FRAMES = 16
VIDEO_FPS = 8
VIDEO_SHARD_SIZE = 250


def mjpeg_avi(jpegs: list, width: int, height: int, fps: int) -> bytes:
    """An AVI file (RIFF: hdrl with avih/strh/strf, movi with one ``00dc`` chunk per frame, idx1) holding
    Motion-JPEG frames: the simplest real video container, readable by FFmpeg (and so decord, PyAV, OpenCV)."""
    import struct

    def chunk(fourcc: bytes, data: bytes) -> bytes:
        return fourcc + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")

    def lst(kind: bytes, data: bytes) -> bytes:
        return b"LIST" + struct.pack("<I", len(data) + 4) + kind + data

    n, biggest = len(jpegs), max(len(j) for j in jpegs)
    avih = struct.pack("<14I", 1_000_000 // fps, biggest * fps, 0, 0x10, n, 0, 1, biggest, width, height, 0, 0, 0, 0)
    strh = b"vidsMJPG" + struct.pack("<IHHIIIIIIiI4h", 0, 0, 0, 0, 1, fps, 0, n, biggest, -1, 0, 0, 0, width, height)
    strf = struct.pack("<IiiHH4sIiiII", 40, width, height, 1, 24, b"MJPG", width * height * 3, 0, 0, 0, 0)
    hdrl = lst(b"hdrl", chunk(b"avih", avih) + lst(b"strl", chunk(b"strh", strh) + chunk(b"strf", strf)))
    movi, index, offset = [], [], 4
    for j in jpegs:
        c = chunk(b"00dc", j)
        index.append(b"00dc" + struct.pack("<III", 0x10, offset, len(j)))  # 0x10: key frame
        movi.append(c)
        offset += len(c)
    body = b"AVI " + hdrl + lst(b"movi", b"".join(movi)) + chunk(b"idx1", b"".join(index))
    return b"RIFF" + struct.pack("<I", len(body)) + body


def render_video(rng: random.Random, size: int, frames: int = VIDEO_FRAMES, motion: str | None = None):
    """One clip: (list of JPEG frames, caption, metadata). The shape, colour and background are drawn as in
    ``render``; ``motion`` (a ``MOTIONS`` key) is random unless given."""
    from PIL import Image, ImageDraw

    motion = motion or rng.choice(list(MOTIONS))
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    fg = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color])
    dark = rng.random() < 0.5
    if color in ("white", "yellow"):
        dark = True
    elif color == "black":
        dark = False
    base = [rng.randint(10, 90) if dark else rng.randint(160, 235) for _ in range(3)]
    bg = Image.new("RGB", (size, size), tuple(base))
    d = ImageDraw.Draw(bg)
    freq = rng.uniform(0.5, 3)
    for row in range(0, size, 4):
        shade = int(18 * math.sin(row / size * math.pi * freq))
        d.rectangle([0, row, size, row + 3], fill=tuple(max(0, min(255, c + shade)) for c in base))
    scale = rng.choice(["small", "large"])
    r0 = size * (rng.uniform(0.13, 0.16) if scale == "small" else rng.uniform(0.19, 0.23))
    lo, hi = r0 * 1.3, size - r0 * 1.3
    cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    rot = rng.uniform(-0.35, 0.35) + {"triangle": -math.pi / 2, "star": -math.pi / 2, "diamond": -math.pi / 2,
                                       "square": math.pi / 4}.get(shape, 0.0)
    sign, phase = rng.choice([-1, 1]), rng.random() * 2 * math.pi
    period = rng.uniform(5, 8)  # frames per blink / pulse cycle
    palette = [fg] + [tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[o])
                      for o in rng.sample([o for o in COLORS if o != color], 2)]
    hold, offset = rng.randint(3, 5), rng.randrange(3)
    jpegs = []
    for t in range(frames):
        u = t / (frames - 1)
        x, y, r, visible, fill = cx, cy, r0, True, fg
        if motion == "sideways":
            x = lo + (hi - lo) * (u if sign > 0 else 1 - u)
        elif motion == "colors":  # three colours in turn, a few frames each
            fill = palette[(t // hold + offset) % len(palette)]
        elif motion == "blinking":
            visible = math.sin(2 * math.pi * t / period + phase) > 0
        elif motion == "pulsing":
            r = r0 * (1 + 0.45 * math.sin(2 * math.pi * t / period + phase))
        else:  # still: the camera shakes by a pixel
            x, y = cx + rng.uniform(-1, 1), cy + rng.uniform(-1, 1)
        img = bg.copy()
        if visible:
            dd = ImageDraw.Draw(img)
            if shape == "circle":
                dd.ellipse([x - r, y - r, x + r, y + r], fill=fill)
            elif shape == "ring":
                dd.ellipse([x - r, y - r, x + r, y + r], outline=fill, width=max(2, int(r * 0.35)))
            else:
                dd.polygon(_polygon(shape, x, y, r, rot), fill=fill)
        jpegs.append(_jpeg(img))
    template = rng.choice(MOTION_ONLY if rng.random() < 0.5 else VIDEO_TEMPLATES)
    if motion == "colors" and "{color}" in template:  # no single colour to name
        template = rng.choice(MOTION_ONLY + ["a {shape} {motion}.", "a {size} {shape} {motion}."])
    if color == "orange":
        template = template.replace("a {color}", "an {color}")
    caption = template.format(color=color, shape=shape, size=scale, bg="dark" if dark else "light",
                              motion=MOTIONS[motion])
    return jpegs, caption, {"shape": shape, "color": color, "size": scale, "motion": motion}


def _write_videos(root: Path, n: int, per_class: int, seed: int, size: int) -> dict:
    folder = root / "video_train"
    folder.mkdir(parents=True)
    for shard in range(math.ceil(n / VIDEO_SHARD_SIZE)):
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(shard * VIDEO_SHARD_SIZE, min(n, (shard + 1) * VIDEO_SHARD_SIZE)):
                jpegs, caption, meta = render_video(random.Random(f"{seed}-vtr-{i}"), size)
                key = f"vt{i:07d}"
                _add(tar, f"{key}.avi", mjpeg_avi(jpegs, size, size, VIDEO_FPS))
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "caption": caption, **meta}).encode())
    # held-out clips: zero-shot folders (motion: every class balanced; colours: the same clips' colour folders
    # would be unbalanced, so they get their own) and a retrieval manifest
    out: dict = {"train": {"samples": n, "shards": len(list(folder.glob("*.tar"))), "frames": VIDEO_FRAMES,
                           "fps": VIDEO_FPS}, "zeroshot": {}}
    for task, classes in (("motion", list(MOTIONS)), ("colors", list(COLORS))):
        base = root / "zeroshot_video" / task
        for c in classes:
            (base / "test" / c).mkdir(parents=True)
        i = 0
        for k in range(per_class):
            for c in classes:
                rng = random.Random(f"{seed}-zs-{task}-{i}")
                i += 1
                if task == "motion":
                    jpegs, _, _ = render_video(rng, size, motion=c)
                else:
                    while True:  # a colour-balanced set: draw until the colour matches
                        jpegs, _, meta = render_video(rng, size)
                        if meta["color"] == c and meta["motion"] != "colors":
                            break
                (base / "test" / c / f"{k:04d}.avi").write_bytes(mjpeg_avi(jpegs, size, size, VIDEO_FPS))
        names = [MOTIONS[c] for c in sorted(classes)] if task == "motion" else sorted(classes)
        (base / "classnames.txt").write_text("".join(c + "\n" for c in names))
        (base / "templates.txt").write_text("".join(t + "\n" for t in ZS_VIDEO_TEMPLATES[task]))
        out["zeroshot"][task] = {"classes": names, "per_class": per_class}
    val = root / "video_val"
    val.mkdir()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "caption"])
    for i in range(per_class * 4):
        jpegs, caption, _ = render_video(random.Random(f"{seed}-vva-{i}"), size)
        (val / f"{i:05d}.avi").write_bytes(mjpeg_avi(jpegs, size, size, VIDEO_FPS))
        writer.writerow([f"video_val/{i:05d}.avi", caption])
    (root / "video_val.csv").write_text(buf.getvalue())
    out["val"] = {"samples": per_class * 4, "manifest": "video_val.csv"}
    return out


def make_demo(out: Path | str, n_train: int = 6400, n_val: int = 512, image_size: int = 64, seed: int = 0,
              per_class: int = 40, n_videos: int = 1000, video_per_class: int = 16, force: bool = False) -> dict:
    """Write the demo dataset to ``out`` (atomically); reuse it when it is already there with the same settings.
    ``n_videos`` training clips (0: no videos), ``video_per_class`` held-out clips per zero-shot video class."""
    out = Path(out)
    params = {"version": VERSION, "n_train": n_train, "n_val": n_val, "image_size": image_size, "seed": seed,
              "per_class": per_class, "n_videos": n_videos, "video_per_class": video_per_class}
    meta_path = out / "demo.json"
    if meta_path.is_file() and not force:
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("params") == params:
                return meta
        except json.JSONDecodeError:
            pass
    t0 = time.perf_counter()
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    n_tr = _write_shards(tmp / "train", n_train, seed, image_size, "tr")
    n_va = _write_shards(tmp / "val", n_val, seed + 1_000_003, image_size, "va")
    zs = _write_zeroshot(tmp / "zeroshot", per_class, seed + 2_000_003, image_size)
    meta = {"params": params, "train": {"samples": n_tr, "shards": len(list((tmp / "train").glob("*.tar")))},
            "val": {"samples": n_va}, "zeroshot": zs}
    if n_videos:
        meta["video"] = _write_videos(tmp, n_videos, video_per_class, seed + 3_000_003, image_size)
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    (tmp / "demo.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return meta
