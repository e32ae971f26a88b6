"""``evaclip demo``: the whole lifecycle on the embedded demo data."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo(
    out: Annotated[Path, typer.Option("--out", "-o",
                                      help="Folder of the demo's runs and outputs.")] = Path("runs/demo"),
    from_stage: Annotated[int, typer.Option("--from-stage", min=1,
                                            help="Start at this stage (1-7); earlier outputs are reused.")] = 1,
):
    """The whole lifecycle on the embedded demo data: train a teacher -> distill -> train the student's CLIP ->
    finetune-video -> convert -> eval suite -> push --dry-run, with a summary table (about 5 min on 2 CPU cores)."""
    from evaclip_cli.lifecycle import run_demo

    code = run_demo(out, skip=from_stage - 1)
    if code:
        raise typer.Exit(code)
