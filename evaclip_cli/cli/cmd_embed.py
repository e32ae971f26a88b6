"""``evaclip embed INPUT -m MODEL -o OUT``: image and/or text embeddings (clip-retrieval's layout), resumable,
data-parallel with --nproc."""
from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from evaclip_cli.cli.cmd_eval import _data_parallel
from evaclip_cli.cli.options import (
    Arch,
    BatchSize,
    DType,
    EvaConfig,
    EvalNproc,
    Model,
    Precision,
    PrecisionOpt,
    Pretrained,
    Workers,
)


class InputFormat(str, Enum):
    auto = "auto"
    files = "files"
    webdataset = "webdataset"
    csv = "csv"


def embed(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(
        metavar="INPUT", help="An image folder (name.txt beside name.jpg is its caption), webdataset shards (a .tar, "
        "a {000..009} pattern or a folder of .tar) or a CSV/TSV with a path and/or caption column.",
        show_default=False)],
    model: Model,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Output folder: img_emb/, text_emb/, img_tokens/ (safetensors), metadata/ (JSONL); "
        "run again to resume.")],
    input_format: Annotated[InputFormat, typer.Option(
        "--input-format", help="auto: from the path (.csv/.tsv, .tar, else an image folder).")] = InputFormat.auto,
    image: Annotated[Optional[bool], typer.Option(
        "--image/--no-image", help="Image embeddings (default: if the input has images).",
        show_default=False)] = None,
    text: Annotated[Optional[bool], typer.Option(
        "--text/--no-text", help="Text embeddings of the captions (default: if the input has captions).",
        show_default=False)] = None,
    tokens: Annotated[bool, typer.Option(
        "--tokens", help="Also the image tower's last-layer patch tokens \\[rows, patches, width], the form VLMs "
        "consume (img_tokens/).")] = False,
    dtype: Annotated[DType, typer.Option("--dtype", help="dtype of the written tensors.")] = DType.fp16,
    normalize: Annotated[bool, typer.Option(
        "--normalize/--no-normalize", help="L2-normalise the embeddings (not the tokens).")] = True,
    write_batch_size: Annotated[Optional[int], typer.Option(
        "--write-batch-size", min=1, help="Rows per output shard, the unit of resume (default: 100,000; 1,000 with "
        "--tokens).", show_default=False)] = None,
    path_col: Annotated[Optional[str], typer.Option(
        "--path-col", help="CSV/TSV: image path column (default: path, filepath, image, file, url...); relative "
        "to the table's folder.")] = None,
    caption_col: Annotated[Optional[str], typer.Option(
        "--caption-col", help="CSV/TSV: caption column (default: caption, text or title).")] = None,
    wds_image_key: Annotated[Optional[str], typer.Option(
        "--wds-image-key", help="Webdataset: image extension(s), e.g. jpg or 'jpg;png' (default: webp, png, jpg, "
        "jpeg).")] = None,
    wds_caption_key: Annotated[str, typer.Option("--wds-caption-key", help="Webdataset: caption extension.")] = "txt",
    pretrained: Pretrained = None, eva_config: EvaConfig = None, arch: Arch = None, batch_size: BatchSize = 256,
    workers: Workers = None, precision: PrecisionOpt = Precision.auto, nproc: EvalNproc = 1,
):
    """Embed a collection for retrieval or as a VLM's image features: safetensors shards of image and/or text
    embeddings plus a JSONL index (key or path, caption, shard, offset), clip-retrieval's layout. A killed run,
    started again with the same command, keeps its finished shards; unreadable images are skipped and counted."""
    from evaclip_cli.eval.embed import EmbedJob, describe, prepare, run_embed

    job = EmbedJob(source=source, output=output, model=model, input_format=input_format.value, image=image,
                   text=text, tokens=tokens, dtype=dtype.value, normalize=normalize,
                   write_batch_size=write_batch_size, batch_size=batch_size, workers=workers,
                   precision=precision.value, pretrained=pretrained, eva_config=eva_config, arch=arch,
                   path_col=path_col, caption_col=caption_col, caption_key=wds_caption_key,
                   image_keys=[k.strip().lower() for k in wds_image_key.split(";") if k.strip()]
                   if wds_image_key else None)
    with _output_lock(output):
        # bad input and a bad output are one line here, before any rank starts (a rank prepares its own)
        plan = prepare(job) if "LOCAL_RANK" not in os.environ else None
        with _data_parallel(ctx, nproc):
            summary = run_embed(job, plan)
    if summary is not None:
        print(describe(summary, output))


def _output_lock(output: Path):
    """The output's lock, held by the command's own process (the ranks it starts write distinct shards)."""
    import contextlib

    from evaclip_cli.atomic import output_lock

    return contextlib.nullcontext() if "LOCAL_RANK" in os.environ else output_lock(output)
