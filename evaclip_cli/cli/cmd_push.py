"""Typer wiring of the push commands (imports stay light: heavy modules load inside the commands)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer


class PushDType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def register(app, eval_app) -> None:
    """Add this module's commands to the `evaclip` app (and its `eval` group)."""

    @app.command("push")
    def push(
        src: Path = typer.Argument(..., help="An open_clip folder, an evaclip run folder (its final/ or "
                                   "checkpoints/), or anything `evaclip convert` reads (converted on the way)."),
        repo: str = typer.Option(..., "--repo", help="Hub repo id, OWNER/NAME (created if missing)."),
        private: bool = typer.Option(False, "--private", help="Create the repo private (an existing repo keeps its "
                                     "visibility)."),
        revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (created from main if "
                                               "missing); with --create-pr, the branch the PR targets."),
        create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing."),
        commit_message: Optional[str] = typer.Option(None, "--commit-message", "-m", help="Commit title."),
        results: Optional[Path] = typer.Option(None, "--results", help="results.json of `evaclip eval suite` (or "
                                               "one eval --output JSON): the card's evaluation table."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Write the exact folder that would be uploaded "
                                     "(--out) and list it; upload nothing."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder written by --dry-run "
                                           "(default: NAME-push)."),
        force: bool = typer.Option(False, "--force", help="Replace the --dry-run folder if it exists."),
        overwrite_card: bool = typer.Option(False, "--overwrite-card", help="Replace a README.md already on the "
                                            "Hub (kept by default)."),
        card: Optional[Path] = typer.Option(None, "--card", help="Upload this README.md instead of the generated "
                                            "card (e.g. one edited from a --dry-run)."),
        license: str = typer.Option("mit", "--license", help="License in the card metadata (EVA-CLIP's weights "
                                    "are MIT)."),
        datasets: Optional[List[str]] = typer.Option(None, "--dataset", help="Hub dataset id for the card "
                                                     "metadata (repeatable; known corpora in a run's recipe are "
                                                     "added)."),
        max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="Reshard the safetensors at "
                                                     "this size (e.g. 5GB, 500MB); default: as the source "
                                                     "(conversions: 5GB)."),
        dtype: Optional[PushDType] = typer.Option(None, "--dtype", help="Cast the weights (default: as the "
                                                  "source)."),
        eva_config: Optional[Path] = typer.Option(None, "--eva-config", help="Conversion: the reference repo's "
                                                  "model config JSON of an EVA .pt."),
        model: Optional[str] = typer.Option(None, "--model", help="Conversion: released name or evaclip arch."),
        recipe: Optional[str] = typer.Option(None, "--recipe", help="Conversion: take the model from a recipe "
                                             "(DeepSpeed sources)."),
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
