"""``evaclip embed``: image and/or text embeddings of a collection, for retrieval or as a VLM's image features.

Inputs (listed up front, so ranks take disjoint work and a restart finds the same rows): an image folder (every
image under it, sorted; a ``name.txt`` beside ``name.jpg`` is its caption, as img2dataset writes them), webdataset
shards (a ``.tar``, a brace pattern or a folder of ``.tar``; image and caption parts by extension) or a CSV/TSV with a
path column and/or a caption column (relative paths from the table's folder).

Output, clip-retrieval's layout with safetensors and JSONL:

    OUT/img_emb/img_emb_00000.safetensors       "embeddings" [rows, D]     (--image)
    OUT/text_emb/text_emb_00000.safetensors     "embeddings" [rows, D]     (--text)
    OUT/img_tokens/img_tokens_00000.safetensors "tokens" [rows, patches, width]  (--tokens: the tower's last layer)
    OUT/metadata/metadata_00000.jsonl           one line per row: key, path or tar, caption, shard, offset
    OUT/embed_config.json                       what the files depend on (a restart must match it)
    OUT/embed.json                              totals, written when every shard is done

Output shard ``s`` holds input rows ``[s·N, (s+1)·N)`` (``N`` = ``--write-batch-size``) minus the unreadable ones
(skipped and counted); every file is written atomically and the metadata file last, so a shard whose files all exist
is finished: a killed run, restarted, does only the others. Ranks (``--nproc``) take the unfinished shards in turn;
the batches never cross a shard, so a shard's bytes do not depend on which run or rank wrote it.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from evaclip_cli.errors import UserError
from evaclip_cli.models.clip import torch_dtype

CONFIG = "embed_config.json"
SUMMARY = "embed.json"
ROWS_PER_SHARD = 100_000  # default --write-batch-size: 200 MB of fp16 1024-d embeddings
ROWS_PER_SHARD_TOKENS = 1_000  # with --tokens: 0.8 GB of an 18B's fp16 patch tokens (256 x 1536 a row)
PATH_COLUMNS = ("path", "filepath", "image_path", "image", "file", "filename", "url")
CAPTION_COLUMNS = ("caption", "text", "title")


# --------------------------------------------------------------------------------------------------- the input
@dataclass
class Row:
    """One input row: its key (relative path, tar key, or the table's path), where its image is (a file or a tar
    member; None: text only) and its caption (None: image only)."""
    key: str
    image: Any = None  # data.benchmarks.Locator
    caption: Optional[str] = None


@dataclass
class Listing:
    rows: list
    format: str  # files | webdataset | csv
    missing: int = 0  # samples without a part that was asked for: skipped and counted
    notes: list = field(default_factory=list)

    @property
    def has_images(self) -> bool:
        return any(r.image is not None for r in self.rows)

    @property
    def has_captions(self) -> bool:
        return any(r.caption is not None for r in self.rows)

    @property
    def all_captioned(self) -> bool:
        return all(r.caption is not None for r in self.rows)


def detect_format(source: str) -> str:
    """``webdataset`` (a .tar, a pattern, a folder of .tar), ``csv`` (.csv/.tsv), or ``files`` (an image folder)."""
    p = Path(source)
    if p.is_file() and p.suffix.lower() in (".csv", ".tsv"):
        return "csv"
    if ".tar" in source and not p.is_dir():
        return "webdataset"
    if p.is_dir():
        has_tars = any(p.glob("*.tar"))
        from evaclip_cli.data.benchmarks import IMG_EXTS

        has_images = any(q.suffix.lower() in IMG_EXTS for q in p.rglob("*") if q.is_file())
        return "webdataset" if has_tars and not has_images else "files"
    if p.is_file():
        raise UserError(f"{source}: not a CSV/TSV table (.csv, .tsv), webdataset shard (.tar) or image folder")
    raise UserError(f"{source}: input not found (give an image folder, webdataset shards or a CSV/TSV of paths "
                    "and captions)")


def _list_files(root: Path) -> Listing:
    from evaclip_cli.data.benchmarks import IMG_EXTS

    if not root.is_dir():
        raise UserError(f"{root}: not a folder (--input-format files takes an image folder)")
    rows = []
    for p in sorted(q for q in root.rglob("*") if q.is_file() and q.suffix.lower() in IMG_EXTS):
        txt = p.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None
        rows.append(Row(str(p.relative_to(root)), p, caption))
    if not rows:
        raise UserError(f"{root}: no images (looked for {', '.join(IMG_EXTS)} files, recursively)")
    return Listing(rows, "files")


def _shard_paths(source: str) -> list[Path]:
    from evaclip_cli.data.wds import expand_shards

    p = Path(source)
    shards = sorted(p.glob("*.tar")) if p.is_dir() else [Path(s) for s in expand_shards(source)]
    if not shards:
        raise UserError(f"{source}: no .tar shards")
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: shard not found")
    return shards


def _list_shards(source: str, image_keys: Optional[list], caption_key: str) -> Listing:
    from evaclip_cli.data.benchmarks import WDS_IMG_EXTS, _index_shards, read_bytes

    samples, errors = _index_shards(_shard_paths(source))
    exts = image_keys or list(WDS_IMG_EXTS) + ["bmp"]
    rows = []
    for key, parts in samples:
        img = next((parts[e] for e in exts if e in parts), None)
        cap = parts.get(caption_key)
        caption = read_bytes(cap).decode("utf-8", errors="replace").strip() if cap is not None else None
        rows.append(Row(key, img, caption))
    if not rows:
        raise UserError(f"{source}: no samples in the shards" + (f" ({errors[0]})" if errors else ""))
    return Listing(rows, "webdataset", notes=errors)


def _column(header: list, given: Optional[str], candidates: tuple, what: str, path: Path) -> Optional[int]:
    lower = [h.strip().lower() for h in header]
    if given is not None:
        if given.lower() not in lower:
            raise UserError(f"{path}: no column '{given}' ({what}); the header has {', '.join(header)}")
        return lower.index(given.lower())
    return next((lower.index(c) for c in candidates if c in lower), None)


def _list_table(path: Path, path_col: Optional[str], caption_col: Optional[str]) -> Listing:
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            table = list(csv.reader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot read the table ({e})") from None
    if not table:
        raise UserError(f"{path}: empty table (a header with a path and/or caption column, then one row per item)")
    header, body = table[0], [r for r in table[1:] if any(c.strip() for c in r)]
    pi = _column(header, path_col, PATH_COLUMNS, "--path-col", path)
    ci = _column(header, caption_col, CAPTION_COLUMNS, "--caption-col", path)
    if pi is None and ci is None:
        raise UserError(f"{path}: no path column ({', '.join(PATH_COLUMNS)}) and no caption column "
                        f"({', '.join(CAPTION_COLUMNS)}) in the header; name them with --path-col/--caption-col")
    rows, missing = [], 0
    for n, r in enumerate(body, start=2):
        if len(r) < len(header):
            missing += 1
            continue
        key = r[pi].strip() if pi is not None else f"row{n}"
        if key.startswith(("http://", "https://")):
            raise UserError(f"{path}:{n}: {key[:80]} is a URL; evaclip embed reads local files (download them first, "
                            "e.g. with img2dataset, and give the files or shards)")
        image = (path.parent / key) if pi is not None and key else None
        rows.append(Row(key, image, r[ci] if ci is not None else None))
    if not rows:
        raise UserError(f"{path}: no complete rows under the header")
    return Listing(rows, "csv", missing=missing)


def list_input(source: str, fmt: str = "auto", *, path_col: Optional[str] = None, caption_col: Optional[str] = None,
               image_keys: Optional[list] = None, caption_key: str = "txt") -> Listing:
    """Every row of the input, in a fixed order."""
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt == "files":
        return _list_files(Path(source))
    if fmt == "webdataset":
        return _list_shards(source, image_keys, caption_key)
    if fmt == "csv":
        if not Path(source).is_file():
            raise UserError(f"{source}: table not found")
        return _list_table(Path(source), path_col, caption_col)
    raise UserError(f"input format '{fmt}' is not one of auto, files, webdataset, csv")


# -------------------------------------------------------------------------------------------------- the job
@dataclass
class EmbedJob:
    """What to embed, with what, and how it is written. ``image``/``text``: None = whatever the input has."""
    source: str
    output: Path
    model: str
    input_format: str = "auto"
    image: Optional[bool] = None
    text: Optional[bool] = None
    tokens: bool = False
    dtype: str = "fp16"
    normalize: bool = True
    write_batch_size: Optional[int] = None  # rows per output shard; None: ROWS_PER_SHARD(_TOKENS)
    batch_size: int = 256
    workers: Optional[int] = None
    precision: str = "auto"
    pretrained: Optional[str] = None
    eva_config: Optional[str] = None
    arch: Optional[str] = None
    path_col: Optional[str] = None
    caption_col: Optional[str] = None
    image_keys: Optional[list] = None
    caption_key: str = "txt"


@dataclass
class Plan:
    """The rows to embed (only those with every part asked for) and the towers to run."""
    rows: list
    image: bool
    text: bool
    missing: int
    format: str
    size: int  # rows per output shard
    shards: int

    def shard_rows(self, s: int) -> range:
        return range(s * self.size, min(len(self.rows), (s + 1) * self.size))


def plan(job: EmbedJob) -> Plan:
    """List the input and decide the towers; a row without a part that is asked for is skipped and counted."""
    got = list_input(job.source, job.input_format, path_col=job.path_col, caption_col=job.caption_col,
                     image_keys=job.image_keys, caption_key=job.caption_key)
    image = got.has_images if job.image is None else job.image
    # by default, text when every row has a caption (a folder where a few images have a .txt: images only)
    text = (got.all_captioned or not image) and got.has_captions if job.text is None else job.text
    if job.image and not got.has_images:
        raise UserError(f"{job.source}: no images to embed (--image); the input has captions only")
    if job.text and not got.has_captions:
        raise UserError(f"{job.source}: no captions to embed (--text); give a caption column / .txt parts")
    if not (image or text):
        raise UserError("nothing to embed: both --no-image and --no-text")
    if job.tokens and not image:
        raise UserError("--tokens needs the image tower; the input has no images or --no-image was given")
    rows = [r for r in got.rows if (r.image is not None or not image) and (r.caption is not None or not text)]
    if not rows:
        raise UserError(f"{job.source}: no row has {'an image' if image else ''}{' and ' if image and text else ''}"
                        f"{'a caption' if text else ''}")
    size = job.write_batch_size or (ROWS_PER_SHARD_TOKENS if job.tokens else ROWS_PER_SHARD)
    return Plan(rows, image, text, got.missing + len(got.rows) - len(rows), got.format, size, -(-len(rows) // size))


def _fingerprint(job: EmbedJob, p: Plan) -> dict:
    """What the written files depend on: a restart with anything else would mix two outputs."""
    import hashlib

    from evaclip_cli.eval.prompts import fingerprint

    keys = hashlib.sha256("\n".join(r.key for r in p.rows).encode()).hexdigest()[:24]
    return {"source": str(Path(job.source).resolve()), "format": p.format, "rows": len(p.rows), "keys": keys,
            "model": job.model,
            "weights": fingerprint(job.model, f"{job.pretrained}|{job.eva_config}|{job.arch}"),
            "pretrained": job.pretrained, "image": p.image, "text": p.text, "tokens": job.tokens, "dtype": job.dtype,
            "normalize": job.normalize, "write_batch_size": p.size, "precision": job.precision}


# ------------------------------------------------------------------------------------------------ the output
def _files(out: Path, s: int, p: Plan, tokens: bool) -> list[Path]:
    """The files of output shard ``s``, the metadata (the completion mark) last."""
    files = []
    if p.image:
        files.append(out / "img_emb" / f"img_emb_{s:05d}.safetensors")
    if p.text:
        files.append(out / "text_emb" / f"text_emb_{s:05d}.safetensors")
    if tokens:
        files.append(out / "img_tokens" / f"img_tokens_{s:05d}.safetensors")
    return files + [out / "metadata" / f"metadata_{s:05d}.jsonl"]


def done(out: Path, s: int, p: Plan, tokens: bool) -> bool:
    return all(f.is_file() for f in _files(out, s, p, tokens))


def check_output(out: Path) -> None:
    """The output folder can be created or written: one line otherwise, before any work."""
    import os

    from evaclip_cli.atomic import cannot

    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{out}: cannot write the output here, {parent} is a file, not a folder")
            break
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG).is_file():
        raise UserError(f"{out}: a folder that is not an `evaclip embed` output (no {CONFIG}); choose a new or "
                        "empty --output")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write {out}: {cannot(e, out)}") from None


def prepare(job: EmbedJob) -> Plan:
    """List the input, check the output and record (or compare) what it depends on; stale temporaries of killed
    runs are removed. Every rank calls it (the same result); the first call creates the folder."""
    from evaclip_cli import atomic

    p = plan(job)
    out = Path(job.output)
    check_output(out)
    want = _fingerprint(job, p)
    cfg = out / CONFIG
    if cfg.is_file():
        try:
            have = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            have = {}
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            raise UserError(f"{out} holds embeddings of another input, model or options (differs in: "
                            f"{', '.join(diff)}); choose another --output, or remove it to start over")
    elif _rank() == 0:
        atomic.write_json(cfg, want)
    for sub in ("img_emb", "text_emb", "img_tokens", "metadata"):
        atomic.remove_stale_temporaries(out / sub)
    return p


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _write_tensor(path: Path, name: str, t: Any) -> None:
    from safetensors.torch import save_file

    from evaclip_cli.atomic import atomic_file

    with atomic_file(path) as tmp:
        save_file({name: t.contiguous()}, str(tmp))


def _metadata_line(row: Row, s: int, offset: int) -> str:
    from evaclip_cli.data.benchmarks import TarMember

    rec: dict = {"key": row.key}
    if isinstance(row.image, TarMember):
        rec["tar"] = row.image.tar
    elif row.image is not None:
        rec["path"] = str(row.image)
    if row.caption is not None:
        rec["caption"] = row.caption
    rec.update(shard=s, offset=offset)
    return json.dumps(rec, ensure_ascii=False)


def write_shard(out: Path, s: int, p: Plan, rows: list, emb: dict) -> None:
    """Output shard ``s``: each tensor file atomically, then its metadata (the completion mark)."""
    from evaclip_cli.atomic import write_text

    if p.image:
        _write_tensor(out / "img_emb" / f"img_emb_{s:05d}.safetensors", "embeddings", emb["image"])
    if p.text:
        _write_tensor(out / "text_emb" / f"text_emb_{s:05d}.safetensors", "embeddings", emb["text"])
    if "tokens" in emb:
        _write_tensor(out / "img_tokens" / f"img_tokens_{s:05d}.safetensors", "tokens", emb["tokens"])
    lines = [_metadata_line(r, s, k) for k, r in enumerate(rows)]
    write_text(out / "metadata" / f"metadata_{s:05d}.jsonl", "".join(ln + "\n" for ln in lines))


# ------------------------------------------------------------------------------------------------ the towers
class _Images:
    """Map-style over the plan's rows: ``(row index, tensor | None)``; an unreadable image is None (skipped)."""

    def __init__(self, rows: list, transform: Any):
        self.rows, self.transform = rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from evaclip_cli.data.benchmarks import decode_image, read_bytes

        try:
            return i, self.transform(decode_image(read_bytes(self.rows[i].image)))
        except Exception:  # corrupt / truncated / missing / unsupported image: skipped and counted
            return i, None


def token_tower(model: Any) -> Any:
    """The image tower's trunk when its patch tokens can be read (open_clip's timm tower: every EVA-CLIP), else a
    one-line error."""
    visual = getattr(model, "visual", None)
    trunk = getattr(visual, "trunk", None)
    if trunk is None or not all(hasattr(trunk, a) for a in ("forward_features", "forward_head")):
        raise UserError(f"--tokens: this model's image tower ({type(visual).__name__}) does not expose its patch "
                        "tokens; evaclip reads them from timm towers (every EVA-CLIP)")
    return trunk


def encode_images(model: Any, x: Any, tokens: bool) -> tuple:
    """(``encode_image(x)``, the last layer's patch tokens [B, patches, width] or None). With tokens the tower runs
    once: open_clip's ``TimmModel`` is ``head(trunk.forward_head(trunk.forward_features(x)))``."""
    if not tokens:
        return model.encode_image(x), None
    trunk = token_tower(model)
    feats = trunk.forward_features(x)
    emb = model.visual.head(trunk.forward_head(feats))
    return emb, feats[:, getattr(trunk, "num_prefix_tokens", 1):]


def _finish_emb(t: Any, normalize: bool, dtype: Any) -> Any:
    import torch.nn.functional as F

    t = t.float()
    return (F.normalize(t, dim=-1) if normalize else t).to(dtype).cpu()


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class _Ctx:
    loaded: Any
    device: str
    dtype: Any
    autocast: Any
    job: EmbedJob
    plan: Plan


def _batches(ctx: _Ctx, shards: list) -> Iterator[tuple]:
    """``(readable row indices, images | None, unreadable)`` in batches that never cross an output shard, decoded
    ahead by DataLoader workers."""
    import torch

    from evaclip_cli.eval.adapters import collate
    from evaclip_cli.eval.runtime import default_workers

    bs = ctx.job.batch_size
    sampler = []
    for s in shards:
        r = ctx.plan.shard_rows(s)
        sampler += [list(r[k:k + bs]) for k in range(0, len(r), bs)]
    workers = default_workers() if ctx.job.workers is None else ctx.job.workers
    loader = torch.utils.data.DataLoader(_Images(ctx.plan.rows, ctx.loaded.transform()), batch_sampler=sampler,
                                         num_workers=workers, collate_fn=collate,
                                         pin_memory=ctx.device.startswith("cuda"))
    yield from loader


def _embed_shard(ctx: _Ctx, s: int, images: Optional[Iterator], progress: Any) -> tuple[list, dict, int]:
    """(rows kept, {"image", "text", "tokens"}: tensors, rows skipped) of output shard ``s``; ``progress(n)`` after
    each batch of ``n`` rows."""
    import torch

    from evaclip_cli.eval.prompts import text_encoder
    from evaclip_cli.eval.tokenize import fast_tokenizer

    r = ctx.plan.shard_rows(s)
    bs, model = ctx.job.batch_size, ctx.loaded.model
    tokenize, encode_text = fast_tokenizer(ctx.loaded.tokenize), text_encoder(model)  # its pieces cached per shard
    parts: dict = {"image": [], "text": [], "tokens": []}
    kept: list = []
    skipped = 0
    for start in range(0, len(r), bs):
        chunk = list(r[start:start + bs])
        if images is not None:
            idx, x, bad = next(images)
            skipped += len(bad)
            if x is not None:
                with ctx.autocast():
                    emb, tok = encode_images(model, x.to(ctx.device), ctx.job.tokens)
                parts["image"].append(_finish_emb(emb, ctx.job.normalize, ctx.dtype))
                if tok is not None:
                    parts["tokens"].append(tok.to(ctx.dtype).cpu())
            chunk = idx
        kept += chunk
        if ctx.plan.text and chunk:
            tokens = tokenize([ctx.plan.rows[i].caption for i in chunk]).to(ctx.device)
            with ctx.autocast():
                e = encode_text(tokens)
            parts["text"].append(_finish_emb(e, ctx.job.normalize, ctx.dtype))
        progress(min(bs, len(r) - start))
    out = {k: torch.cat(v) for k, v in parts.items() if v}
    for k, on in (("image", ctx.plan.image), ("text", ctx.plan.text), ("tokens", ctx.job.tokens)):
        if on and k not in out:  # a shard whose every image was unreadable: an empty tensor of the right width
            out[k] = _empty(ctx, k)
    return [ctx.plan.rows[i] for i in kept], out, skipped


def _empty(ctx: _Ctx, kind: str) -> Any:
    import torch

    model = ctx.loaded.model
    s = ctx.loaded.image_size
    with torch.no_grad(), ctx.autocast():
        if kind == "text":
            from evaclip_cli.eval.tokenize import fast_tokenizer

            e = model.encode_text(fast_tokenizer(ctx.loaded.tokenize)([""]).to(ctx.device))
        else:
            emb, tok = encode_images(model, torch.zeros(1, 3, s, s, device=ctx.device), kind == "tokens")
            e = tok if kind == "tokens" else emb
    return e[:0].to(ctx.dtype).cpu()


class _Report:
    """Progress: a Rich bar of this rank's rows on a terminal (rank 0), else one plain line per shard written."""

    def __init__(self, total_rows: int, shards: int, rank: int, world: int):
        from evaclip_cli.eval.report import Progress

        self.shards, self.written = shards, 0
        self.who = f"rank {rank}: " if world > 1 else ""
        self.tty = rank == 0 and sys.stdout.isatty()
        label = "embedding" + (f" (rank 0 of {world})" if world > 1 else "")
        self.bar = Progress(total_rows, label, self.tty)

    def __enter__(self) -> "_Report":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, n: int) -> None:
        self.bar(n)

    def shard(self, s: int, rows: int, skipped: int) -> None:
        self.written += 1
        if not self.tty:
            extra = f", {skipped} skipped" if skipped else ""
            print(f"{self.who}shard {s:05d} written ({rows:,} rows{extra}); {self.written} of "
                  f"{self.shards}", flush=True)


def run_embed(job: EmbedJob, p: Optional[Plan] = None) -> Optional[dict]:
    """Embed every unfinished shard of this rank (``RANK`` of ``WORLD_SIZE``, taken in turn), then (rank 0, after
    every rank is done) write ``embed.json`` and print the totals. Returns the summary on rank 0."""
    import torch

    from evaclip_cli.checkpoints.load import load_clip
    from evaclip_cli.engine.dist import barrier
    from evaclip_cli.eval.runtime import autocast, resolve_precision, setup_dist
    from evaclip_cli.models.openclip_compat import import_open_clip_lean

    p = prepare(job) if p is None else p
    out = Path(job.output)
    pending = [s for s in range(p.shards) if not done(out, s, p, job.tokens)]
    import_open_clip_lean(job.model, job.pretrained)
    rank, world, device = setup_dist()
    mine = pending[rank::world]
    if mine:
        loaded = load_clip(job.model, device=device, eva_config=job.eva_config, pretrained=job.pretrained,
                           arch=job.arch)
        if job.tokens:
            token_tower(loaded.model)
        dtype = torch_dtype(job.dtype)
        ctx = _Ctx(loaded, device, dtype, autocast(device, resolve_precision(job.precision, device)), job, p)
        total = sum(len(p.shard_rows(s)) for s in mine)
        with torch.no_grad(), _Report(total, len(mine), rank, world) as report:
            images = iter(_batches(ctx, mine)) if p.image else None
            for s in mine:
                rows, emb, skipped = _embed_shard(ctx, s, images, report)
                write_shard(out, s, p, rows, emb)
                report.shard(s, len(rows), skipped)
    barrier()
    if rank != 0:
        return None
    summary = summarize(job, p, len(pending))
    if summary["rows"] == 0:
        raise UserError(f"{job.source}: none of the {len(p.rows):,} rows could be read (unreadable or missing images); "
                        "check the files and their paths")
    return summary


def summarize(job: EmbedJob, p: Plan, written: int) -> dict:
    """``embed.json``: rows embedded and skipped over every shard (those of earlier runs too), the files' shapes."""
    from evaclip_cli import atomic

    out = Path(job.output)
    rows = 0
    for s in range(p.shards):
        with open(out / "metadata" / f"metadata_{s:05d}.jsonl", encoding="utf-8") as fh:
            rows += sum(1 for _ in fh)
    summary = {"rows": rows, "skipped": len(p.rows) - rows + p.missing, "shards": p.shards, "written_now": written,
               "source": str(job.source), "format": p.format, "model": job.model, "image": p.image, "text": p.text,
               "tokens": job.tokens, "dtype": job.dtype, "normalize": job.normalize, "write_batch_size": p.size,
               "folders": [f for f, on in (("img_emb", p.image), ("text_emb", p.text), ("img_tokens", job.tokens),
                                           ("metadata", True)) if on]}
    atomic.write_json(out / SUMMARY, summary)
    return summary


def describe(summary: dict, out: Union[str, Path]) -> str:
    """The one line printed at the end."""
    what = " + ".join(w for w, on in (("image", summary["image"]), ("text", summary["text"]),
                                      ("patch tokens", summary["tokens"])) if on)
    again = "" if summary["written_now"] == summary["shards"] else \
        f" ({summary['shards'] - summary['written_now']} shard(s) from an earlier run kept)"
    skipped = f", {summary['skipped']:,} unreadable or incomplete skipped" if summary["skipped"] else ""
    norm = ", normalised" if summary["normalize"] else ""
    return (f"embedded {summary['rows']:,} rows ({what}, {summary['dtype']}{norm}{skipped}) into {out}: "
            f"{', '.join(f + '/' for f in summary['folders'])}{again}")
