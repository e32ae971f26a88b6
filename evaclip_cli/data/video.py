"""Video-text data: decoding with decord, frame sampling, video shards / CSV manifests mixed with image shards, and
the zero-shot video eval sets.

* Sampling: a clip of N frames is cut into T equal segments; training takes a random frame in each segment
  (segment jitter, TSN-style), eval takes each segment's centre; the paper's single-frame protocol takes the
  middle frame (``frame_indices``).
* Training sources: webdataset shards whose samples are ``KEY.mp4|webm|avi|mkv|mov`` + ``KEY.txt``, image shards
  (``KEY.jpg`` ...), and CSV manifests (``path,caption``; paths relative to the CSV's folder), each read in units
  of ``CSV_UNIT`` rows (located by byte offset) so they shard over ranks/workers like tar files. All of it runs
  through the resumable stream of ``data/wds.py`` (same seeding, same exact resume), decoded in the DataLoader
  workers. Several sources are mixed sample by sample by weight (each source a sub-stream with its own position).
* A batch holds the frames of all its samples in one tensor (``image``: [sum of frames, 3, S, S]) and the frame
  count of each sample (``nframes``: 1 for an image, T for a clip), so the stage encodes every frame in one
  forward and averages each clip's frame embeddings.
* One random crop (RandomResizedCrop parameters) and one flip per clip, applied to all of its frames.
* A corrupt, empty or unsupported video is skipped and counted (``skipped_corrupt``); a sample without a video or
  image or caption counts as ``skipped_missing``. Files whose container is cut short (or an AVI without an index)
  are refused before decord sees them: its FFmpeg AVI path ends the process on those instead of raising.
"""
from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Iterator

from evaclip_cli.data.decode import VideoError, frame_indices, read_clip
from evaclip_cli.data.wds import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_EXTS,
    VIDEO_EXTS,
    StreamDataset,
    derive_seed,
    log,
    rrc_params,
)
from evaclip_cli.errors import UserError

CSV_UNIT = 256  # manifest rows per unit (the CSV counterpart of a shard)


def _to_tensor(frames):
    """uint8 [T, H, W, 3] -> float [T, 3, H, W] in [0, 1]."""
    import torch

    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)


def train_clip_transform(frames, rng: random.Random, image_size: int, scale, interpolation: str = "bicubic",
                         hflip: bool = False):
    """One RandomResizedCrop (and flip) for every frame of the clip, CLIP mean/std: float [T, 3, S, S]."""
    from torchvision.transforms import functional as TF

    x = _to_tensor(frames)
    h, w = x.shape[-2:]
    i, j, ch, cw = rrc_params(rng, w, h, scale)
    interp = TF.InterpolationMode.BICUBIC if interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
    x = TF.resized_crop(x, i, j, ch, cw, [image_size, image_size], interpolation=interp, antialias=True)
    if hflip and rng.random() < 0.5:
        x = TF.hflip(x)
    return TF.normalize(x.clamp_(0, 1), CLIP_MEAN, CLIP_STD)


def eval_clip_transform(frames, image_size: int):
    """CLIP eval preprocessing on every frame: short side to S (bicubic), centre crop, mean/std: [T, 3, S, S]."""
    from torchvision.transforms import functional as TF

    x = _to_tensor(frames)
    x = TF.resize(x, image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [image_size, image_size])
    return TF.normalize(x.clamp_(0, 1), CLIP_MEAN, CLIP_STD)


# ------------------------------------------------------------------------------------------------ training data
def read_manifest(path: Path) -> list[tuple[str, str]]:
    """(video path, caption) rows of a ``path,caption`` CSV (header required; paths relative to the CSV)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
            if "path" not in fields or "caption" not in fields:
                raise UserError(f"{path}: a video manifest needs a header with 'path' and 'caption' columns "
                                f"(found: {', '.join(fields) or 'nothing'})")
            rows = []
            for row in reader:
                row = {k.strip().lower(): (v or "") for k, v in row.items() if k}
                p = row["path"].strip()
                if p:
                    rows.append((str(p if Path(p).is_absolute() else path.parent / p), row["caption"].strip()))
    except OSError as e:
        raise UserError(f"{path}: cannot read the manifest ({e.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable CSV ({e})") from None
    return rows


def _csv_records(fh):
    """Raw CSV records of a binary file handle from its position: (byte offset, text). A record ends at a line
    end outside quotes (RFC 4180: quoted fields may hold newlines; quotes inside are doubled)."""
    while True:
        start, parts, quotes = fh.tell(), [], 0
        while True:
            line = fh.readline()
            if not line:
                break
            parts.append(line)
            quotes += line.count(b'"')
            if quotes % 2 == 0:
                break
        if not parts:
            return
        yield start, b"".join(parts).decode("utf-8", errors="replace")


def _csv_units(path: str) -> list[str]:
    """A manifest as units of ``CSV_UNIT`` rows, ``PATH#first:end@byte_offset``: one pass over the file, and a
    worker reads only its unit's bytes (a 23M-row manifest is never held in memory)."""
    read_manifest_header(Path(path))
    units, row = [], 0
    with open(path, "rb") as fh:
        records = _csv_records(fh)
        next(records, None)  # the header
        for offset, text in records:
            if not text.strip():
                continue
            if row % CSV_UNIT == 0:
                units.append([row, offset])
            row += 1
    if not row:
        raise UserError(f"{path}: the manifest lists no video")
    return [f"{path}#{a}:{min(a + CSV_UNIT, row)}@{off}" for a, off in units]


def read_manifest_header(path: Path) -> list[str]:
    """The column names of a ``path,caption`` manifest (errors name the file)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            fields = [f.strip().lower() for f in next(csv.reader(fh), [])]
    except OSError as e:
        raise UserError(f"{path}: cannot read the manifest ({e.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable CSV ({e})") from None
    if "path" not in fields or "caption" not in fields:
        raise UserError(f"{path}: a video manifest needs a header with 'path' and 'caption' columns "
                        f"(found: {', '.join(fields) or 'nothing'})")
    return fields


class VideoStreamDataset(StreamDataset):
    """The resumable stream of ``data/wds.py`` with video samples: frames sampled, decoded and augmented per
    clip; images pass through as one-frame clips."""

    def __init__(self, sources, *args, frames: int = 8, jitter: bool = True, **kw):
        units = []
        for shards, weight in sources:
            expanded: list[str] = []
            for s in shards:
                expanded.extend(_csv_units(s) if s.lower().endswith(".csv") else [s])
            units.append((expanded, weight))
        super().__init__(units, *args, **kw)
        self.frames, self.jitter = frames, jitter
        self._manifests: dict[str, list] = {}  # manifest -> its column names

    def _members(self, url: str, counters: dict) -> Iterator[dict]:
        head, _, rng_part = url.rpartition("#")
        if not head.lower().endswith(".csv"):
            yield from super()._members(url, counters)
            return
        if head not in self._manifests:
            self._manifests[head] = read_manifest_header(Path(head))
        fields = self._manifests[head]
        span, _, offset = rng_part.partition("@")
        a, b = (int(x) for x in span.split(":"))
        folder = Path(head).parent
        try:
            with open(head, "rb") as fh:
                fh.seek(int(offset))
                i = a
                for _, text in _csv_records(fh):
                    if i >= b:
                        break
                    if not text.strip():
                        continue
                    values = next(csv.reader([text.rstrip("\r\n")]), [])
                    row = {k: (values[j].strip() if j < len(values) else "") for j, k in enumerate(fields)}
                    p = row.get("path", "")
                    raw = {"__key__": f"{head}:{i}", "txt": row.get("caption", "").encode()}
                    if p:
                        raw["path"] = str(p if Path(p).is_absolute() else folder / p)
                    yield raw
                    i += 1
        except (OSError, csv.Error) as e:  # the manifest changed or vanished under the run: like a bad shard
            counters["shard_errors"] += 1
            log.warning("manifest %s rows %d-%d: %s (rest of the unit skipped)", head, a, b, e)

    def _decode(self, raw: dict, rng: random.Random, counters: dict):
        ext = next((e for e in VIDEO_EXTS if e in raw), None)
        if ext is None and "path" not in raw:
            if any(e in raw for e in IMAGE_EXTS):
                item = super()._decode(raw, rng, counters)
                return None if item is None else (item[0].unsqueeze(0), item[1])
            counters["skipped_missing"] += 1
            return None
        if "txt" not in raw:
            counters["skipped_missing"] += 1
            return None
        src = raw[ext] if ext is not None else raw["path"]
        if ext is None and Path(src).suffix.lower().lstrip(".") not in VIDEO_EXTS + IMAGE_EXTS:
            counters["skipped_corrupt"] += 1  # an unsupported file type in a manifest
            return None
        try:
            caption = raw["txt"].decode("utf-8").strip()
            mode = "jitter" if self.jitter else "uniform"
            if ext is None and Path(src).suffix.lower().lstrip(".") in IMAGE_EXTS:
                import numpy as np
                from PIL import Image

                with Image.open(src) as im:
                    frames = np.asarray(im.convert("RGB"))[None]
            else:
                frames = read_clip(src, lambda n: frame_indices(n, self.frames, mode, rng))
        except Exception:
            counters["skipped_corrupt"] += 1
            return None
        if not caption:
            counters["skipped_missing"] += 1
            return None
        clip = train_clip_transform(frames, rng, self.image_size, self.scale, self.interpolation, self.hflip)
        return clip, caption

    def _collate(self, items: list) -> dict:
        import torch

        return {"image": torch.cat(items), "nframes": [int(t.shape[0]) for t in items]}

    def __iter__(self):
        """Several sources are mixed sample by sample: each source is a sub-stream of its own (its own unit
        schedule and position), and sample k of the stream comes from the source drawn by weight from an RNG
        seeded by (seed, stream, k). The position is (k, unit and offset of each sub-stream): exact resume still
        holds. One source: the plain stream of ``data/wds.py``."""
        if len(self.sources) == 1:
            yield from super().__iter__()
            return
        import copy

        stream, counters = self._open_stream()
        n = len(self.sources)
        start = self.start.get(str(stream)) or [0] * (1 + 2 * n)
        if len(start) != 1 + 2 * n:
            raise UserError(f"the checkpoint's data position has {len(start)} fields for {n} sources "
                            f"({1 + 2 * n} expected); resume with the recipe's data.train sources unchanged")
        k, cur = start[0], [list(start[1 + 2 * j:3 + 2 * j]) for j in range(n)]
        subs = []
        for j, (shards, weight) in enumerate(self.sources):
            child = copy.copy(self)
            child.sources, child.all_shards = [(shards, weight)], list(shards)
            child.seed = derive_seed(self.seed, "source", j)
            child.start = {str(stream): cur[j]}
            subs.append(child._samples(stream, counters))
        weights = [w for _, w in self.sources]

        def mixed():
            nonlocal k
            while True:
                j = random.Random(derive_seed(self.seed, "mix", stream, k)).choices(range(n), weights=weights)[0]
                k += 1
                unit, upos, member, raw = next(subs[j])
                cur[j] = [unit, upos]
                yield (j, unit, member), [k] + [x for c in cur for x in c], raw

        yield from self._batches(stream, counters, mixed())


def build_video_loader(sources, frames: int, jitter: bool, **kw):
    """``data/wds.py``'s resumable loader over image shards, video shards and CSV manifests (see the module
    docstring); ``kw`` as ``build_train_loader``."""
    from evaclip_cli.data.wds import build_train_loader

    return build_train_loader(sources, dataset_cls=VideoStreamDataset, frames=frames, jitter=jitter, **kw)


# ---------------------------------------------------------------------------------------------------- eval sets
def _class_name(folder: str) -> str:
    """Folder name -> prompt name: ``ApplyEyeMakeup`` -> ``apply eye makeup`` (UCF-101), ``riding_a_bike`` ->
    ``riding a bike``."""
    import re

    name = folder.replace("_", " ")
    if " " not in name and any(c.isupper() for c in name[1:]):
        name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
        return name.lower()
    return name


class ClipDataset:
    """Eval clips: (path, label) pairs decoded to [T, 3, S, S] (``frames`` segment centres, or the middle frame
    when ``frames`` is 1). ``__getitem__`` returns None for a clip that cannot be decoded (counted by the caller)."""

    def __init__(self, items: list[tuple[str, int]], frames: int, image_size: int):
        self.items, self.frames, self.image_size = items, frames, image_size
        self.missing = 0  # listed in a CSV, not on disk (Kinetics clips that vanished): counted as skipped

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        mode = "middle" if self.frames == 1 else "uniform"
        try:
            frames = read_clip(path, lambda n: frame_indices(n, self.frames, mode))
        except VideoError:
            return None
        return eval_clip_transform(frames, self.image_size), label, i


EVAL_SPLITS = ("test", "val", "validate", "validation")


def load_video_classification(root, frames: int, image_size: int):
    """A zero-shot video classification set: (ClipDataset, classnames, templates).

    Layouts (class names and templates from ``classnames.txt`` / ``templates.txt`` next to the set when present):

    * a folder ``ROOT/<class>/*.mp4``, or ``ROOT/<split>/<class>/`` with split ``test``/``val`` — UCF-101 unpacked
      is one; with ``ucfTrainTestlist/testlist01.txt`` (UCF-101's split 1) only the listed clips are used;
    * a CSV with a ``label`` column and either a ``path`` column or Kinetics' ``youtube_id,time_start,time_end``
      (clips named ``<youtube_id>_<start:06d>_<end:06d>.<ext>`` anywhere under the CSV's folder or the set's
      folder), given directly or found as ``ROOT/annotations/<split>.csv`` / ``ROOT/<split>.csv`` — the layout of
      the Kinetics downloads (``k400/val/*.mp4`` + ``k400/annotations/val.csv``). Listed clips that are not on disk
      (Kinetics videos vanish from YouTube) are counted as skipped."""

    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: video eval set not found (a folder of <class>/*.mp4 or a CSV)")
    missing, is_csv = 0, root.is_file()
    meta_dir = root.parent if is_csv else root
    if is_csv:
        items, classnames, missing = _csv_classification(root, [root.parent, root.parent.parent])
    else:
        base = next((root / s for s in EVAL_SPLITS if (root / s).is_dir()), root)
        testlist = next((f for f in (root / "ucfTrainTestlist" / "testlist01.txt", root / "testlist01.txt")
                         if f.is_file()), None)
        class_dirs = sorted(d for d in base.iterdir() if d.is_dir())
        with_videos = [d for d in class_dirs if any(p.suffix.lower().lstrip(".") in VIDEO_EXTS for p in d.iterdir())]
        if testlist is not None:
            items, classnames, missing = _ucf_testlist(root, testlist)
        elif with_videos:
            items = []
            for label, d in enumerate(class_dirs):
                files = sorted(p for p in d.iterdir() if p.suffix.lower().lstrip(".") in VIDEO_EXTS)
                if not files:
                    raise UserError(f"{d}: no videos ({', '.join('.' + e for e in VIDEO_EXTS)})")
                items += [(str(p), label) for p in files]
            classnames = [_class_name(d.name) for d in class_dirs]
        else:
            csvs = [root / "annotations" / f"{s}.csv" for s in EVAL_SPLITS] + [root / f"{s}.csv" for s in EVAL_SPLITS]
            found = next((c for c in csvs if c.is_file()), None)
            if found is None:
                raise UserError(f"{base}: no class folders with videos (expected {base}/<class>/*.mp4) and no "
                                f"annotation CSV ({root}/annotations/val.csv)")
            items, classnames, missing = _csv_classification(found, [base, root])
    names_file = meta_dir / "classnames.txt"
    if names_file.is_file():
        names = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
        if len(names) != len(classnames):
            raise UserError(f"{names_file}: {len(names)} class names for {len(classnames)} classes; one name per "
                            "class, in sorted order")
        classnames = names
    tpl_file = meta_dir / "templates.txt"
    templates = [ln.strip() for ln in tpl_file.read_text().splitlines() if ln.strip()] if tpl_file.is_file() \
        else list(DEFAULT_VIDEO_TEMPLATES)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise UserError(f"{tpl_file}: template without the {{c}} placeholder: {bad[0]!r}")
    ds = ClipDataset(items, frames, image_size)
    ds.missing = missing
    return ds, classnames, templates


# prompts for action videos without a templates.txt (CLIP's Kinetics/UCF prompts are of this kind)
DEFAULT_VIDEO_TEMPLATES = ["a video of a person {c}.", "a photo of a person {c}.", "a video of {c}.",
                           "a person {c}.", "a photo of {c}."]


def _video_index(folders) -> dict[str, Path]:
    """File stem -> video path, for every video under the folders (the first found wins)."""
    index: dict[str, Path] = {}
    for d in folders:
        if d.is_dir():
            for p in sorted(d.rglob("*")):
                if p.suffix.lower().lstrip(".") in VIDEO_EXTS:
                    index.setdefault(p.stem, p)
    return index


def _ucf_testlist(root: Path, testlist: Path):
    """UCF-101's split file (``Class/v_Class_g01_c01.avi`` per line); classes from ``classInd.txt`` when present."""
    lines = [ln.strip().split()[0] for ln in testlist.read_text().splitlines() if ln.strip()]
    ind = testlist.parent / "classInd.txt"
    if ind.is_file():
        classes = [ln.split()[1] for ln in ind.read_text().splitlines() if len(ln.split()) == 2]
    else:
        classes = sorted({ln.split("/")[0] for ln in lines})
    index = {c: i for i, c in enumerate(classes)}
    items, missing = [], 0
    for ln in lines:
        cls = ln.split("/")[0]
        path = next((b / ln for b in (root, root / "UCF-101", root / "UCF101") if (b / ln).is_file()), None)
        if path is None or cls not in index:
            missing += 1
            continue
        items.append((str(path), index[cls]))
    if not items:
        raise UserError(f"{testlist}: none of the {len(lines)} listed clips was found under {root}")
    return items, [_class_name(c) for c in classes], missing


def _csv_classification(path: Path, search: list):
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in csv.DictReader(fh)]
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the CSV ({e})") from None
    if not rows or "label" not in rows[0]:
        raise UserError(f"{path}: a video classification CSV needs a header with a 'label' column and 'path' (or "
                        "Kinetics' youtube_id,time_start,time_end)")
    kinetics = "path" not in rows[0]
    if kinetics and not {"youtube_id", "time_start", "time_end"} <= set(rows[0]):
        raise UserError(f"{path}: no 'path' column and no Kinetics columns (youtube_id, time_start, time_end)")
    labels = sorted({r["label"] for r in rows})
    index = {c: i for i, c in enumerate(labels)}
    files = _video_index(search) if kinetics else {}
    items, missing = [], 0
    for r in rows:
        if kinetics:
            try:
                stem = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
            except ValueError:
                raise UserError(f"{path}: time_start/time_end must be numbers (row {r})") from None
            found = files.get(stem) or files.get(r["youtube_id"])
            if found is None:
                missing += 1  # Kinetics clips vanish from YouTube: missing ones are counted, not fatal
                continue
            items.append((str(found), index[r["label"]]))
        else:
            p = Path(r["path"])
            items.append((str(p if p.is_absolute() else path.parent / p), index[r["label"]]))
    if not items:
        raise UserError(f"{path}: none of the {len(rows)} listed clips was found")
    return items, [_class_name(c) if "_" in c else c for c in labels], missing


def load_video_retrieval(manifest, frames: int, image_size: int):
    """A video-text retrieval set from a ``path,caption`` manifest (a path may repeat: several captions per
    video): (ClipDataset over the unique videos, captions, caption -> video index)."""
    rows = read_manifest(Path(manifest))
    if not rows:
        raise UserError(f"{manifest}: the manifest lists no video")
    videos: dict[str, int] = {}
    captions, owner = [], []
    for path, caption in rows:
        if not caption:
            continue
        owner.append(videos.setdefault(path, len(videos)))
        captions.append(caption)
    items = [(p, i) for p, i in videos.items()]
    return ClipDataset(items, frames, image_size), captions, owner
