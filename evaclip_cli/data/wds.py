"""Image-text training data from webdataset tar shards (the layout img2dataset writes), deterministic and resumable.

Shards: brace-expandable patterns (``data/{00000..00999}.tar``), several joined with ``::``, several sources mixed
by weight. Samples: ``KEY.jpg|jpeg|png|webp`` + ``KEY.txt`` (+ ``KEY.json``, ignored here).

How the stream is made (per rank r and DataLoader worker w, the *stream* s = r·W + w):

* a stream reads *units*: unit u is one shard read front to back. Resampled: unit u's shard is drawn by source
  weight from an RNG seeded by (seed, s, u) — nothing depends on earlier units. Epoch mode: unit u is shard
  ``order_e[s + S·i]`` of epoch e's permutation (or, with fewer shards than streams, every shard with the members
  ``k ≡ s (mod S)``).
* inside a unit, samples are shuffled within blocks of ``shuffle_buffer`` raw members (permutation seeded by
  (seed, s, u, block)); augmentation parameters come from an RNG seeded by (seed, s, u, member index).
* a worker forms whole batches; torch's DataLoader hands them out round-robin over workers, in order.

So a stream's position is just (unit, samples yielded in that unit). Every batch carries its stream's position and
counters; ``TrainLoader.consumed(batch)`` records them, ``state_dict()`` returns them, and a loader built with that
state skips to the same place in each stream (reading, not decoding, the members before it) and rotates the
workers so the next batch comes from the right stream: the batches after a resume are the ones an uninterrupted
run would have seen. Corrupt images, samples missing a part and unreadable shards are skipped and counted.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import random
import tarfile
from pathlib import Path
from typing import Any, Iterator, Optional

from evaclip_cli.errors import UserError

log = logging.getLogger("evaclip.data")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "avi", "mkv", "mov")  # what the video stage reads (evaclip_cli.data.video)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
COUNTERS = ("samples", "skipped_corrupt", "skipped_missing", "shard_errors")
MAX_SKIPPED_IN_A_ROW = 1000  # skipped samples in a row, none usable: the data cannot be what the recipe expects
_WARNED: set[str] = set()  # shards already named in a warning (this process)


def derive_seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def expand_shards(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    out: list[str] = []
    for part in str(pattern).split("::"):
        out.extend(braceexpand(part.strip()))
    return out


def _open(url: str):
    if url.startswith("pipe:"):
        import subprocess

        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)
        return proc.stdout
    if url.startswith(("http://", "https://")):
        import urllib.request

        return urllib.request.urlopen(url)
    return open(url, "rb")


def iter_members(url: str, counters: dict) -> Iterator[dict]:
    """Samples of one shard, grouped by key, in tar order: {"__key__", ext: bytes, ...}. A read error ends the
    shard (counted); the samples read before it are kept."""
    current: dict = {}
    try:
        with _open(url) as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = m.name.rsplit("/", 1)[-1]
                if name.startswith(".") or "." not in name:
                    continue
                key, ext = name.split(".", 1)
                prefix = m.name[: len(m.name) - len(name)]
                key = prefix + key
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                if not current:
                    current = {"__key__": key}
                f = tar.extractfile(m)
                data = f.read() if f is not None else b""
                if len(data) != m.size:  # stream mode does not notice a truncated shard by itself
                    raise tarfile.ReadError(f"truncated at {m.name} ({len(data)} of {m.size} bytes)")
                current[ext.lower()] = data
            if "://" not in url and not url.startswith("pipe:"):
                # a complete tar ends with two zero blocks; a file cut inside a header ends "cleanly" without them
                size = Path(url).stat().st_size
                if size - tar.offset < 1024:
                    raise tarfile.ReadError(f"truncated after byte {tar.offset} (no end-of-archive marker)")
    except (tarfile.TarError, OSError, EOFError) as e:
        counters["shard_errors"] += 1
        if url not in _WARNED:  # named once per process, however often a resampled stream draws it
            _WARNED.add(url)
            what = "not a tar file" if "invalid header" in str(e) or "bad checksum" in str(e) else str(e)
            log.warning("shard %s: %s (skipped; counted in shard_errors)", url, what)
    if current:
        yield current


def rrc_params(rng: random.Random, width: int, height: int, scale, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop parameters (torchvision's algorithm) from a private RNG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class DataError(Exception):
    """The data cannot be trained on (nothing usable, every shard unreadable): raised in a DataLoader worker, it
    reaches the main process as a ``UserError`` with this one line (``TrainLoader``)."""


def caption_of(raw: dict, spec: str) -> Optional[str]:
    """The caption of a raw sample: ``spec`` is a member extension (``txt``, the default; ``caption``) or
    ``json:FIELD`` (a field of the ``.json`` member, dots for nesting: ``json:meta.caption``). None when absent."""
    if spec.startswith("json:"):
        if "json" not in raw:
            return None
        import json

        obj = json.loads(raw["json"].decode("utf-8"))
        for part in spec[5:].split("."):
            if not isinstance(obj, dict) or part not in obj:
                return None
            obj = obj[part]
        return None if obj is None else str(obj).strip()
    data = raw.get(spec)
    return None if data is None else data.decode("utf-8").strip()


def _parent_gone(parent: Optional[int]) -> bool:
    """True in a DataLoader worker whose main process has died (it was re-parented)."""
    import os

    return parent is not None and os.getppid() != parent


class StreamDataset:
    """The per-worker stream (an IterableDataset; see the module docstring)."""

    def __init__(self, sources: list[tuple[list[str], float]], image_size: int, micro_batch: int, tokenizer,
                 seed: int, rank: int, world_size: int, workers: int, resampled: bool, shuffle_buffer: int,
                 scale, interpolation: str, hflip: bool, start: Optional[dict], rotate: int,
                 captions: Optional[dict[str, str]] = None, max_skipped: int = MAX_SKIPPED_IN_A_ROW):
        self.sources, self.image_size, self.micro_batch = sources, image_size, micro_batch
        self.tokenizer, self.seed, self.rank, self.world_size = tokenizer, seed, rank, world_size
        self.workers, self.resampled, self.block = max(1, workers), resampled, max(1, shuffle_buffer)
        self.scale, self.interpolation, self.hflip = tuple(scale), interpolation, hflip
        self.start = start or {}
        self.rotate = rotate
        self.all_shards = [s for shards, _ in sources for s in shards]
        self.captions = captions or {}  # shard -> caption spec (see caption_of); default "txt"
        self.max_skipped = max_skipped

    # ---- unit schedule ---------------------------------------------------------------------------------------
    def _unit(self, stream: int, u: int) -> tuple[str, Optional[tuple[int, int]]]:
        """(shard url, member filter (modulus, residue) or None) of unit u of a stream."""
        n_streams = self.world_size * self.workers
        if self.resampled:
            rng = random.Random(derive_seed(self.seed, "unit", stream, u))
            weights = [w for _, w in self.sources]
            shards, _ = self.sources[rng.choices(range(len(self.sources)), weights=weights)[0]]
            return shards[rng.randrange(len(shards))], None
        n = len(self.all_shards)
        if n >= n_streams:
            per_epoch = len(range(stream, n, n_streams))
            epoch, i = divmod(u, per_epoch)
            order = list(range(n))
            random.Random(derive_seed(self.seed, "epoch", epoch)).shuffle(order)
            return self.all_shards[order[stream + n_streams * i]], None
        epoch, i = divmod(u, n)
        order = list(range(n))
        random.Random(derive_seed(self.seed, "epoch", epoch)).shuffle(order)
        return self.all_shards[order[i]], (n_streams, stream)

    # ---- samples ---------------------------------------------------------------------------------------------
    def _samples(self, stream: int, counters: dict):
        """(unit, index in unit, member index, raw sample) in yield order, from the stream's start position."""
        unit, offset = self.start.get(str(stream), [0, 0])
        empty_run, dead = 0, set[str]()
        while True:
            url, filt = self._unit(stream, unit)
            members = self._members(url, counters)
            if filt is not None:
                members = (m for k, m in enumerate(members) if k % filt[0] == filt[1])
            block_idx, pos, got_any = 0, 0, False
            while True:
                block = []
                for _ in range(self.block):
                    m = next(members, None)
                    if m is None:
                        break
                    block.append(m)
                if not block:
                    break
                got_any = True
                order = list(range(len(block)))
                random.Random(derive_seed(self.seed, "shuffle", stream, unit, block_idx)).shuffle(order)
                for j in order:
                    if pos >= offset:
                        block[j]["__url__"] = url
                        yield unit, pos + 1, block_idx * self.block + j, block[j]
                    pos += 1
                block_idx += 1
            if got_any:
                empty_run, dead = 0, set()
            else:
                empty_run += 1
                dead.add(url)
                if len(dead) >= len(self.all_shards) or empty_run >= 1000:
                    raise DataError(
                        f"none of the {len(self.all_shards)} shard(s) yields a sample (first: {self.all_shards[0]}); "
                        "each is unreadable or empty: check that the files are webdataset .tar shards "
                        "(`evaclip data inspect PATTERN` lists what it finds)")
            unit, offset = unit + 1, 0

    def _members(self, url: str, counters: dict) -> Iterator[dict]:
        """The raw samples of one unit (a shard); subclasses read other unit kinds (e.g. CSV row ranges)."""
        return iter_members(url, counters)

    def _collate(self, items: list) -> dict:
        """Decoded items of one batch -> the batch's tensors (subclasses batch clips of varying length)."""
        import torch

        return {"image": torch.stack(items)}

    def _decode(self, raw: dict, rng: random.Random, counters: dict):
        from PIL import Image
        from torchvision.transforms import functional as TF

        from evaclip_cli.data.images import to_rgb8

        need_text = self.tokenizer is not None  # image-only stages (distill) ignore captions
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        try:
            caption = caption_of(raw, self.captions.get(raw.get("__url__", ""), "txt")) if need_text else "-"
        except (ValueError, UnicodeDecodeError):
            counters["skipped_corrupt"] += 1
            return None
        if ext is None or not caption:
            counters["skipped_missing"] += 1
            return None
        try:
            with Image.open(io.BytesIO(raw[ext])) as im:
                im.load()
                img = to_rgb8(im)
        except Exception:
            counters["skipped_corrupt"] += 1
            return None
        i, j, h, w = rrc_params(rng, img.width, img.height, self.scale)
        interp = TF.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
        img = TF.resized_crop(img, i, j, h, w, [self.image_size, self.image_size], interpolation=interp,
                              antialias=True)
        if self.hflip and rng.random() < 0.5:
            img = TF.hflip(img)
        t = TF.normalize(TF.to_tensor(img), CLIP_MEAN, CLIP_STD)
        return t, caption

    # ---- the stream a worker serves --------------------------------------------------------------------------
    def _open_stream(self) -> tuple[int, dict]:
        """This worker's stream id and its counters (resumed from the start state): every ``__iter__`` begins so."""
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = self.rank * self.workers + (worker + self.rotate) % self.workers
        counters = dict(self.start.get("counters", {}).get(str(stream), {k: 0 for k in COUNTERS}))
        torch.set_num_threads(1)
        self._parent = os.getppid() if info is not None else None  # a worker exits when the main process dies
        return stream, counters

    def _batches(self, stream: int, counters: dict, samples) -> Iterator[dict]:
        """Decode ``samples`` ((augmentation seed parts, position after the sample, raw sample) in stream order)
        into micro batches; each batch carries the position after its last sample and the counters, so a
        checkpoint resumes exactly after it. Every stream kind ends here."""
        import numpy as np

        items, captions = [], []
        skipped_run, seen = 0, dict[str, int]()  # skipped since the last usable sample; their member extensions
        try:
            for aug_key, pos, raw in samples:
                counters["samples"] += 1
                item = self._decode(raw, random.Random(derive_seed(self.seed, "aug", stream, *aug_key)), counters)
                if item is None:
                    skipped_run += 1
                    for e in raw:
                        if not e.startswith("__"):
                            seen[e] = seen.get(e, 0) + 1
                    if skipped_run >= self.max_skipped:
                        raise DataError(self._nothing_usable(skipped_run, seen, raw))
                    if skipped_run % 64 == 0 and _parent_gone(self._parent):
                        os._exit(1)
                    continue
                skipped_run, seen = 0, {}
                items.append(item[0])
                captions.append(item[1])
                if len(items) == self.micro_batch:
                    batch = {**self._collate(items), "stream": stream, "pos": list(pos), "counters": dict(counters)}
                    if self.tokenizer is not None:
                        trng = np.random.default_rng(derive_seed(self.seed, "text", stream, *pos))
                        batch["text"] = self.tokenizer(captions, trng)
                    if _parent_gone(self._parent):
                        os._exit(1)
                    yield batch
                    items, captions = [], []
        except DataError as e:  # one line for the user, from whichever process reads the data
            yield {"__error__": str(e)}

    def _nothing_usable(self, n: int, seen: dict, last: dict) -> str:
        """The one line for a stream that skipped ``n`` samples in a row: what was looked for, what was found."""
        spec = self.captions.get(last.get("__url__", ""), "txt")
        want = f"an image ({'/'.join(IMAGE_EXTS)}) and a caption in '{spec}'" if self.tokenizer is not None \
            else f"an image ({'/'.join(IMAGE_EXTS)})"
        found = ", ".join(f".{e} {c}" for e, c in sorted(seen.items(), key=lambda kv: -kv[1])) or "no members"
        hint = ""
        if self.tokenizer is not None and spec == "txt" and "txt" not in seen and "json" in seen:
            hint = ("; captions inside the .json member (as img2dataset writes them) are read with caption = "
                    "\"json:caption\" on the data.train source")
        elif self.tokenizer is not None and spec != "txt":
            hint = f"; check the source's caption = \"{spec}\""
        return (f"{n} samples in a row without a usable one (shard {last.get('__url__', '?')}): looked for {want}, "
                f"found {found}{hint}")

    def __iter__(self):
        stream, counters = self._open_stream()
        samples = (((unit, member), [unit, upos], raw) for unit, upos, member, raw in self._samples(stream, counters))
        yield from self._batches(stream, counters, samples)


class TrainLoader:
    """The DataLoader plus the bookkeeping that makes it resumable (see the module docstring)."""

    def __init__(self, dataset: StreamDataset, workers: int, state: Optional[dict]):
        import torch

        self.dataset, self.workers = dataset, max(1, workers)
        self.state: dict[str, Any] = {"batches": 0, "streams": {}, "counters": {}}
        if state:
            self.state = {"batches": int(state["batches"]), "streams": dict(state["streams"]),
                          "counters": dict(state.get("counters", {}))}
        from evaclip_cli.lifeline import worker_dies_with_parent

        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None, pin_memory=False,
            worker_init_fn=worker_dies_with_parent)  # a worker ends with its rank (evaclip_cli/lifeline.py)

    def __iter__(self):
        # iter(DataLoader) starts the worker processes now, not at the first batch: the training loop starts them
        # before it builds the model, so that no worker is forked from a process holding it
        return self._checked(iter(self.loader))

    @staticmethod
    def _checked(batches):
        for batch in batches:
            if "__error__" in batch:  # a worker found the data unusable (DataError): one line, exit 2
                raise UserError(batch["__error__"])
            yield batch

    def consumed(self, batch: dict) -> None:
        s = str(batch["stream"])
        self.state["streams"][s] = list(batch["pos"])
        self.state["counters"][s] = dict(batch["counters"])
        self.state["batches"] += 1

    def state_dict(self) -> dict:
        return {"batches": self.state["batches"], "streams": dict(self.state["streams"]),
                "counters": dict(self.state["counters"]), "workers": self.workers}

    def counters(self) -> dict:
        total = {k: 0 for k in COUNTERS}
        for c in self.state["counters"].values():
            for k in COUNTERS:
                total[k] += c.get(k, 0)
        return total


def build_train_loader(sources, image_size: int, micro_batch: int, workers: int, tokenizer, seed: int = 0,
                       rank: int = 0, world_size: int = 1, resampled: bool = True, shuffle_buffer: int = 1000,
                       scale=(0.9, 1.0), interpolation: str = "bicubic", hflip: bool = False,
                       start_state: Optional[dict] = None, dataset_cls=None,
                       max_skipped: int = MAX_SKIPPED_IN_A_ROW, **dataset_kwargs) -> TrainLoader:
    """``sources``: recipe ``Source`` entries (shards, weight, caption). ``dataset_cls`` (a StreamDataset subclass,
    e.g. the video one) gets ``dataset_kwargs`` as well."""
    expanded = []
    captions: dict[str, str] = {}
    for src in sources:
        shards = expand_shards(src.shards)
        spec = getattr(src, "caption", "txt") or "txt"
        if spec != "txt":
            captions.update({s: spec for s in shards})
        local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
        missing = [s for s in local if not Path(s).is_file()]
        if local and len(missing) == len(local):
            raise UserError(f"data.train shards '{src.shards}': no such file ({missing[0]}); check the path")
        shards = [s for s in shards if s not in missing]
        if missing:
            log.warning("%d of %d shards of %s are missing; training on the rest", len(missing),
                        len(missing) + len(shards), src.shards)
        if src.weight <= 0:
            raise UserError(f"data.train source '{src.shards}' has weight {src.weight}; weights must be > 0")
        expanded.append((shards, float(src.weight)))
    if not expanded:
        raise UserError("no training data sources")
    nworkers = max(1, workers)
    start, rotate = None, 0
    if start_state:
        if int(start_state.get("workers", nworkers)) != nworkers:
            raise UserError(f"the checkpoint's data position was written with data.workers = "
                            f"{start_state.get('workers')}; resume with the same value (now {workers})")
        start = {s: [int(x) for x in p] for s, p in start_state["streams"].items()}  # (unit, offset) or longer
        start["counters"] = start_state.get("counters", {})
        rotate = int(start_state["batches"]) % nworkers
    ds = (dataset_cls or StreamDataset)(expanded, image_size, micro_batch, tokenizer, seed, rank, world_size, nworkers,
                                        resampled, shuffle_buffer, scale, interpolation, hflip, start, rotate,
                                        captions=captions, max_skipped=max_skipped, **dataset_kwargs)
    return TrainLoader(_Iterable(ds), workers, start_state)


def _Iterable(ds):
    import torch

    class _DS(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(ds)

    return _DS()


def inspect_shards(pattern: str, max_captions: int = 5) -> dict[str, Any]:
    """Counts, extensions, sample captions and corrupt/missing counts of a set of shards."""
    from PIL import Image

    shards = expand_shards(pattern)
    counters = {k: 0 for k in COUNTERS}
    exts: dict[str, int] = {}
    captions: list[str] = []
    sizes: list[tuple[int, int]] = []
    per_shard = []
    for url in shards:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            counters["shard_errors"] += 1
            per_shard.append({"shard": url, "samples": 0, "error": "missing"})
            continue
        n_before, err_before = counters["samples"], counters["shard_errors"]
        for raw in iter_members(url, counters):
            counters["samples"] += 1
            for e in raw:
                if e != "__key__":
                    exts[e] = exts.get(e, 0) + 1
            ext = next((e for e in IMAGE_EXTS if e in raw), None)
            vext = next((e for e in VIDEO_EXTS if e in raw), None) if ext is None else None
            if (ext is None and vext is None) or "txt" not in raw:
                counters["skipped_missing"] += 1
                continue
            try:
                if vext is not None:  # a video sample: decodable (first frame) with the training decoder
                    from evaclip_cli.data.decode import read_clip

                    frame = read_clip(raw[vext], lambda n: [0])
                    sizes.append((frame.shape[2], frame.shape[1]))
                else:
                    with Image.open(io.BytesIO(raw[ext])) as im:
                        im.load()
                        sizes.append(im.size)
                cap = raw["txt"].decode("utf-8").strip()
            except Exception:
                counters["skipped_corrupt"] += 1
                continue
            if len(captions) < max_captions:
                captions.append(cap)
        per_shard.append({"shard": url, "samples": counters["samples"] - n_before,
                          "error": "unreadable" if counters["shard_errors"] > err_before else None})
    ok = counters["samples"] - counters["skipped_corrupt"] - counters["skipped_missing"]
    stats = {}
    if sizes:
        ws, hs = [w for w, _ in sizes], [h for _, h in sizes]
        stats = {"min": [min(ws), min(hs)], "max": [max(ws), max(hs)],
                 "mean": [round(sum(ws) / len(ws), 1), round(sum(hs) / len(hs), 1)]}
    return {"shards": len(shards), "samples": counters["samples"], "usable": ok,
            "corrupt": counters["skipped_corrupt"], "missing_part": counters["skipped_missing"],
            "shard_errors": counters["shard_errors"], "extensions": exts, "captions": captions,
            "image_size": stats, "per_shard": per_shard}
