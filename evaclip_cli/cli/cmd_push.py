"""``evaclip push``: a model to the Hugging Face Hub."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evaclip_cli.cli.options import DType


def push(
    src: Annotated[Path, typer.Argument(help="An open_clip folder, an evaclip run folder (its final/ or "
                                        "checkpoints/), or anything `evaclip convert` reads (converted on the way).")],
    repo: Annotated[str, typer.Option("--repo", help="Hub repo id, OWNER/NAME (created if missing).")],
    private: Annotated[bool, typer.Option(
        "--private", help="Create the repo private (an existing repo keeps its visibility).")] = False,
    revision: Annotated[Optional[str], typer.Option(
        "--revision", help="Branch to commit to (created from main if missing); with --create-pr, the branch the PR "
        "targets.")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    commit_message: Annotated[Optional[str], typer.Option("--commit-message", "-m", help="Commit title.")] = None,
    results: Annotated[Optional[Path], typer.Option(
        "--results", help="results.json of `evaclip eval suite` (or one eval --output JSON): the card's evaluation "
        "table.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Write the exact folder that would be uploaded (--out) and list it; upload "
        "nothing.")] = False,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Folder written by --dry-run (default: NAME-push).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the --dry-run folder if it exists.")] = False,
    overwrite_card: Annotated[bool, typer.Option(
        "--overwrite-card", help="Replace a README.md already on the Hub (kept by default).")] = False,
    card: Annotated[Optional[Path], typer.Option(
        "--card", help="Upload this README.md instead of the generated card (e.g. one edited from a "
        "--dry-run).")] = None,
    license: Annotated[str, typer.Option(
        "--license", help="License in the card metadata (EVA-CLIP's weights are MIT).")] = "mit",
    datasets: Annotated[Optional[list[str]], typer.Option(
        "--dataset", help="Hub dataset id for the card metadata (repeatable; known corpora in a run's recipe are "
        "added).")] = None,
    max_shard_size: Annotated[Optional[str], typer.Option(
        "--max-shard-size", help="Reshard the safetensors at this size (e.g. 5GB, 500MB); default: as the source "
        "(conversions: 5GB).")] = None,
    dtype: Annotated[Optional[DType], typer.Option(
        "--dtype", help="Cast the weights (default: as the source).")] = None,
    eva_config: Annotated[Optional[Path], typer.Option(
        "--eva-config", help="Conversion: the reference repo's model config JSON of an EVA .pt.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Conversion: released name or evaclip arch.")] = None,
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", help="Conversion: take the model from a recipe (DeepSpeed sources).")] = None,
):
    """Upload a model to the Hugging Face Hub in one commit: open_clip config, safetensors (sharded with an
    index when large), tokenizer files, and a generated model card (usage, training summary, eval table).
    The token comes from HF_TOKEN or `hf auth login` and is never printed."""
    from evaclip_cli.hub.push import run_push

    run_push(src, repo, private=private, revision=revision, create_pr=create_pr, commit_message=commit_message,
             results=results, dry_run=dry_run, out=out, force=force, overwrite_card=overwrite_card,
             license=license, datasets=datasets or [], card=card, max_shard_size=max_shard_size,
             dtype=dtype.value if dtype else None, eva_config=eva_config, model=model, recipe=recipe,
             echo=typer.echo)
