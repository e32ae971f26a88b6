"""``evaclip predict``: the ranked labels of a few images, a newcomer's first minute with a model.

Each label becomes a class embedding exactly as ``evaclip eval zeroshot`` builds one (``prompts.classifier``: the
mean of its templates' normalised text embeddings, renormalised); an image's probabilities are
``softmax(logit_scale · image_emb · W)`` with the model's own learned ``logit_scale`` (a SigLIP-style model with a
``logit_bias`` gets ``sigmoid(logit_scale · sim + logit_bias)``, each label on its own). Templates: the ones given,
else the 80 ImageNet templates (OpenAI's) that ``eval zeroshot`` uses for ImageNet.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from evaclip_cli.errors import UserError

DEFAULT_TEMPLATES_KEY = "imagenet1k"  # the shipped templates used when none are given


def parse_labels(labels: Optional[str], labels_file: Optional[Path]) -> list[str]:
    """The labels of ``--labels "a,b"`` and/or ``--labels-file`` (one a line), in order; none or a repeat is bad
    input."""
    from evaclip_cli.eval.prompts import _read_list

    got = [x.strip() for x in labels.split(",")] if labels else []
    if labels_file is not None:
        got += _read_list(labels_file, "labels")
    got = [x for x in got if x]
    if not got:
        raise UserError("no labels: pass --labels \"a dog,a cat\" or --labels-file FILE (one label per line)")
    seen: set = set()
    for x in got:
        if x in seen:
            raise UserError(f"label {x!r} is given twice; each label once")
        seen.add(x)
    return got


def resolve_templates(templates: Optional[Sequence[str]], templates_file: Optional[Path]) -> list[str]:
    """``--template`` values and/or a ``--templates`` file, else the shipped ImageNet templates; each needs a ``{}``
    or ``{c}`` placeholder."""
    from evaclip_cli.eval.prompts import _read_list, shipped_metadata

    got = list(templates or [])
    if templates_file is not None:
        got += _read_list(templates_file, "templates")
    if not got:
        return list(shipped_metadata()["templates"][DEFAULT_TEMPLATES_KEY])
    for t in got:
        if "{c}" not in t and "{}" not in t:
            raise UserError(f"template {t!r} has no placeholder; write the label's place as {{}} (\"a photo of a "
                            "{}.\")")
    return got


def check_images(paths: Sequence[Path]) -> None:
    """Every image exists and decodes (before the model is loaded: that can take minutes)."""
    from evaclip_cli.data.benchmarks import decode_image

    if not paths:
        raise UserError("no images: evaclip predict IMAGE... -m MODEL --labels \"a dog,a cat\"")
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"{p}: image not found")
        try:
            decode_image(Path(p).read_bytes())
        except Exception as e:
            why = str(e).split(" <_io.")[0][:120]  # PIL names the BytesIO it read from: noise
            raise UserError(f"{p}: not a readable image ({type(e).__name__}: {why})") from None


def _probabilities(model: Any, image_emb: Any, W: Any) -> Any:
    """[images, labels] probabilities from normalised image embeddings and the classifier ``W``."""
    import torch

    sim = image_emb @ W
    bias = getattr(model, "logit_bias", None)
    scale = model.logit_scale.exp().float() if torch.is_tensor(model.logit_scale) else torch.tensor(100.0)
    if bias is not None:
        return torch.sigmoid(scale * sim + bias.float())
    return torch.softmax(scale * sim, dim=-1)


def predict(model: str, images: Sequence[Path], labels: list[str], templates: list[str], *,
            pretrained: Optional[str] = None, eva_config: Optional[str] = None, arch: Optional[str] = None,
            precision: str = "auto", batch_size: int = 32) -> dict:
    """``{"model", "labels", "templates", "images": [{"image", "predictions": [{"label", "probability"}]}]}``, each
    image's labels ranked by probability (highest first)."""
    import torch
    import torch.nn.functional as F

    from evaclip_cli.checkpoints.load import load_clip
    from evaclip_cli.data.benchmarks import decode_image
    from evaclip_cli.eval.prompts import classifier
    from evaclip_cli.eval.runtime import autocast, resolve_precision
    from evaclip_cli.models.openclip_compat import import_open_clip_lean

    check_images(images)
    import_open_clip_lean(model, pretrained)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_clip(model, device=device, eva_config=eva_config, pretrained=pretrained, arch=arch)
    ac = autocast(device, resolve_precision(precision, device))
    W, _ = classifier(loaded, labels, [t.replace("{}", "{c}") for t in templates], device, 256, ac)
    transform, out = loaded.transform(), []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            chunk = list(images[s:s + batch_size])
            x = torch.stack([transform(decode_image(Path(p).read_bytes())) for p in chunk]).to(device)
            with ac():
                emb = F.normalize(loaded.model.encode_image(x).float(), dim=-1)
            probs = _probabilities(loaded.model, emb, W).cpu()
            for p, row in zip(chunk, probs):
                order = torch.argsort(row, descending=True, stable=True).tolist()
                out.append({"image": str(p), "predictions": [{"label": labels[i], "probability": float(row[i])}
                                                             for i in order]})
    return {"model": str(model), "labels": list(labels), "templates": len(templates), "images": out}


def print_predictions(result: dict, top: int) -> None:
    """A Rich table: each image's ``top`` labels, best first."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['model']} ({result['templates']} template(s) per label)")
    table.add_column("image")
    table.add_column("#", justify="right")
    table.add_column("label")
    table.add_column("probability", justify="right")
    for n, item in enumerate(result["images"]):
        if n:
            table.add_section()
        for rank, pred in enumerate(item["predictions"][:top], start=1):
            table.add_row(item["image"] if rank == 1 else "", str(rank), pred["label"],
                          f"{100 * pred['probability']:.2f}%")
    console = Console()
    if not console.is_terminal:  # a file or a pipe has no width to fit: paths and labels stay whole
        console.width = 200
    console.print(table)
