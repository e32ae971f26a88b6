"""``evaclip predict IMG... -m MODEL --labels "a dog,a cat"``: ranked labels and their probabilities per image."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from evaclip_cli.cli.options import Arch, EvaConfig, Model, Precision, PrecisionOpt, Pretrained


def predict(
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE", help="Image files.", show_default=False)],
    model: Model,
    labels: Annotated[Optional[str], typer.Option(
        "--labels", "-l", help="Comma-separated labels, e.g. \"a dog,a cat\".")] = None,
    labels_file: Annotated[Optional[Path], typer.Option(
        "--labels-file", help="Labels, one per line (added after --labels).")] = None,
    template: Annotated[Optional[list[str]], typer.Option(
        "--template", "-t", help="Prompt template with {} for the label, e.g. \"a photo of a {}.\"; repeat for "
        "several (their embeddings are averaged). Default: the 80 ImageNet templates `evaclip eval zeroshot` uses.")
    ] = None,
    templates: Annotated[Optional[Path], typer.Option(
        "--templates", help="Prompt templates, one per line ({} or {c} for the label).")] = None,
    top: Annotated[Optional[int], typer.Option(
        "--top", "-k", min=1, help="Labels shown per image (default: 5 in the table, all with --json).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (every label ranked) instead of a table.")]
    = False,
    pretrained: Pretrained = None, eva_config: EvaConfig = None, arch: Arch = None,
    precision: PrecisionOpt = Precision.auto,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward.")] = 32,
):
    """Zero-shot classification of a few images against your labels: each image's labels ranked, with
    probabilities softmax(logit_scale · image · label), label embeddings built from prompt templates as in
    `evaclip eval zeroshot`."""
    from evaclip_cli.eval.predict import parse_labels, predict, print_predictions, resolve_templates

    names = parse_labels(labels, labels_file)
    tpls = resolve_templates(template, templates)
    result = predict(model, images, names, tpls, pretrained=pretrained, eva_config=eva_config, arch=arch,
                     precision=precision.value, batch_size=batch_size)
    if as_json:
        if top is not None:
            for item in result["images"]:
                item["predictions"] = item["predictions"][:top]
        print(json.dumps(result, indent=2))
    else:
        print_predictions(result, top or 5)
