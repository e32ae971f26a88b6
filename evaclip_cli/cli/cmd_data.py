"""``evaclip data make-demo | inspect``: make and inspect datasets."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from evaclip_cli.cli.options import complete_recipe


def make_demo(
    out: Annotated[Path, typer.Argument(help="Output folder.")] = Path("demo_data"),
    train: Annotated[int, typer.Option("--train", min=1, help="Training image-text pairs.")] = 6400,
    val: Annotated[int, typer.Option("--val", min=1, help="Held-out image-text pairs.")] = 512,
    image_size: Annotated[int, typer.Option("--image-size", min=16, help="Image side in pixels.")] = 64,
    per_class: Annotated[int, typer.Option("--per-class", min=1, help="Zero-shot eval images per class.")] = 40,
    seed: Annotated[int, typer.Option("--seed", help="Seed (the data is a pure function of it).")] = 0,
    videos: Annotated[int, typer.Option("--videos", min=0, help="Training video-text clips (0: none).")] = 1000,
    video_per_class: Annotated[int, typer.Option("--video-per-class", min=1,
                                                 help="Zero-shot eval clips per class.")] = 16,
    force: Annotated[bool, typer.Option("--force", help="Regenerate even if the folder is current.")] = False,
):
    """Write the embedded procedural demo dataset (image-text and video-text shards, zero-shot eval folders, a video
    retrieval manifest)."""
    from rich.console import Console

    from evaclip_cli.atomic import cannot, check_output
    from evaclip_cli.data.demo import make_demo as write_demo
    from evaclip_cli.errors import UserError

    check_output(out, "folder")
    try:
        meta = write_demo(out, n_train=train, n_val=val, image_size=image_size, seed=seed, per_class=per_class,
                          n_videos=videos, video_per_class=video_per_class, force=force)
    except OSError as e:  # a full disk, a read-only folder
        raise UserError(f"cannot write {out}: {cannot(e, out)}") from None
    zs = ", ".join(f"{k} ({len(v['classes'])} classes)" for k, v in meta["zeroshot"].items())
    line = (f"{out}: {meta['train']['samples']} train pairs in {meta['train']['shards']} shards, "
            f"{meta['val']['samples']} held-out pairs, zero-shot sets: {zs}")
    v = meta.get("video")
    if v:
        vz = ", ".join(f"{k} ({len(c['classes'])} classes)" for k, c in v.get("zeroshot", {}).items()
                       if isinstance(c, dict) and "classes" in c)
        line += (f"; {v.get('train', {}).get('samples', '?')} train clips, zero-shot video sets: {vz or '-'}, "
                 f"retrieval manifest {v.get('val', {}).get('manifest', '-')}")
    Console().print(line, soft_wrap=True)


def inspect(
    shards: Annotated[Optional[str], typer.Argument(
        help="Shard pattern, e.g. 'data/{00000..00099}.tar' (quote the braces).")] = None,
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", "-r", autocompletion=complete_recipe,
        help="Report the data mixture this recipe samples instead: each source's weight, its share of the samples "
             "and its samples over the run, and how many of its shards exist here (nothing is read).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Count samples, extensions and corrupt samples of webdataset shards and show a few captions; or, with
    --recipe, the mixture of sources the recipe will sample."""
    from rich.console import Console
    from rich.table import Table

    from evaclip_cli.data.wds import inspect_shards
    from evaclip_cli.errors import UserError

    if (shards is None) == (recipe is None):
        raise UserError("give a shard pattern or --recipe NAME (not both): `evaclip data inspect 'data/{00000..00099}"
                        ".tar'` or `evaclip data inspect --recipe 18b`")
    if recipe is not None:
        return _inspect_recipe(recipe, json_out)
    assert shards is not None
    rep = inspect_shards(shards)
    if rep["shards"] == 0:
        raise UserError(f"'{shards}' names no shard")
    if json_out:
        typer.echo(json.dumps(rep, indent=2))
        return
    t = Table(title=f"{shards}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    for k in ("shards", "samples", "usable", "corrupt", "missing_part", "shard_errors"):
        t.add_row(k, f"{rep[k]:,}")
    t.add_row("extensions", ", ".join(f"{k} {v:,}" for k, v in sorted(rep["extensions"].items())))
    if rep["image_size"]:
        s = rep["image_size"]
        t.add_row("image size (w×h)", f"min {s['min'][0]}×{s['min'][1]}, mean {s['mean'][0]}×{s['mean'][1]}, "
                                        f"max {s['max'][0]}×{s['max'][1]}")
    c = Console()
    c.print(t)
    for cap in rep["captions"]:
        c.print(f"  • {cap}")


def _inspect_recipe(name: str, json_out: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from evaclip_cli.data.mixture import mixture
    from evaclip_cli.recipes import load_recipe

    r = load_recipe(name).recipe
    if r.data.demo or not r.data.train:
        why = "the embedded demo data (data.demo = true)" if r.data.demo else "no data.train sources"
        if json_out:
            typer.echo(json.dumps({"recipe": r.name, "demo": r.data.demo, "sources": []}, indent=2))
        else:
            Console().print(f"{r.name}: {why}; no mixture to report", soft_wrap=True)
        return
    mix = mixture(r.data.train, r.data.samples, r.data.resampled, video_stage=r.stage == "video",
                  image_weight=r.video.image_weight, video_weight=r.video.video_weight)
    if json_out:
        typer.echo(json.dumps({"recipe": r.name, **mix.to_dict()}, indent=2))
        return
    t = Table(title=f"{r.name}: {r.data.samples:,} samples, {mix.mode}" if r.data.samples else
              f"{r.name}: epochs (data.samples = 0), {mix.mode}")
    for col, right in (("source", False), ("kind", False), ("weight", True), ("share", True),
                       ("samples over the run", True), ("shards here / named", True)):
        t.add_column(col, justify="right" if right else "left", overflow="fold",
                     min_width=24 if col == "source" else None)
    for s in mix.sources:
        here = "URLs" if s.present is None else f"{s.present:,}"
        t.add_row(s.shards, s.kind, f"{s.weight:g}", f"{100 * s.share:.2f}%",
                  "-" if s.samples is None else f"{s.samples:,}", f"{here} / {s.named:,}")
    c = Console()
    c.print(t)
    if mix.mode == "shards by weight":
        c.print("shares are of the shards drawn; of the samples too when every source's shards hold as many samples",
                soft_wrap=True)
    elif mix.mode == "epochs over shards":
        c.print("data.resampled = false: every shard once per epoch, the weights are not used", soft_wrap=True)
