"""The model card of a pushed model: YAML metadata, usage, the architecture (from the weights' safetensors headers,
nothing loaded), the training summary of an evaclip run, and the evaluation table."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Optional

from evaclip_cli import __version__
from evaclip_cli.checkpoints.io import format_size
from evaclip_cli.hub.stage import Staged
from evaclip_cli.models.openclip_compat import CONFIG_NAME

TAGS = ["clip", "eva-clip", "open_clip", "zero-shot-image-classification", "evaclip"]


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def weight_stats(files: dict) -> dict:
    """Parameter counts per tower and dtypes, read from the safetensors headers (no tensor is loaded)."""
    counts = {"visual": 0, "text": 0, "other": 0}
    dtypes: dict[str, int] = {}
    for name, path in files.items():
        if not name.endswith(".safetensors"):
            continue
        for key, info in safetensors_header(path).items():
            if key == "__metadata__":
                continue
            n = 1
            for d in info["shape"]:
                n *= d
            tower = "visual" if key.startswith("visual.") else "other" if key in ("logit_scale", "logit_bias") \
                else "text"
            counts[tower] += n
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + n * _DTYPE_BYTES.get(info["dtype"], 4)
    return {"params": counts, "total": sum(counts.values()), "dtypes": sorted(dtypes, key=lambda k: -dtypes[k])}


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _architecture_rows(cfg: dict, stats: dict) -> list[list[str]]:
    from evaclip_cli.models.specs import spec_from_open_clip_cfg

    rows: list[list[str]] = []
    model_cfg = cfg.get("model_cfg", cfg)
    try:
        spec = spec_from_open_clip_cfg(cfg)
    except Exception:  # a folder evaclip did not write: describe what the config says
        spec = None
    if spec is not None:
        v, t = spec.vision, spec.text
        feats = [("RMSNorm" if v.norm == "rms" else "LayerNorm"), *(["post-norm"] if v.post_norm else []),
                 *(["SwiGLU"] if v.swiglu else []), *(["RoPE"] if v.rope else []), *(["sub-LN"] if v.subln else []),
                 "qkv bias" if v.qkv_bias else "no qkv bias"]
        rows += [["vision tower", f"EVA ViT: width {v.width}, depth {v.depth}, {v.heads} heads, MLP {v.mlp_dim}, "
                                  f"patch {v.patch_size}, image {v.image_size}px ({', '.join(feats)})"],
                 ["text tower", f"width {t.width}, {t.layers} layers, {t.heads} heads, context {t.context_length}, "
                                f"vocabulary {t.vocab_size}"],
                 ["embedding dim", str(spec.embed_dim)]]
    else:
        rows += [["embedding dim", str(model_cfg.get("embed_dim", "?"))],
                 ["vision config", f"`{json.dumps(model_cfg.get('vision_cfg', {}), sort_keys=True)[:300]}`"]]
    p = stats["params"]
    rows.append(["parameters", f"{_params(stats['total'])} (vision {_params(p['visual'])}, text {_params(p['text'])})"])
    rows.append(["weights dtype", ", ".join(d.lower() for d in stats["dtypes"]) or "?"])
    return rows


def _table(rows: list[list[str]], header=("", "")) -> str:
    out = ["| " + " | ".join(header) + " |", "| --- | --- |"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _yaml_list(items: Iterable[str]) -> str:
    return "".join(f"- {json.dumps(i)}\n" for i in items)


def model_card(repo_id: str, staged: Staged, *, license: str = "mit", datasets: Iterable[str] = (),
               results: Optional[dict] = None, base_model: Optional[str] = None) -> str:
    """README.md for the repo: Hub metadata, how to load it (open_clip, evaclip), the architecture, the training
    summary when the source is an evaclip run, the eval-suite table when results are given, and the files."""
    from evaclip_cli.eval.report import datasets_for, results_markdown, training_summary

    cfg = json.loads(staged.files[CONFIG_NAME].read_text())
    stats = weight_stats(staged.files)
    name = repo_id.split("/", 1)[1]
    ds = datasets_for(staged.run_dir, datasets)
    meta = [f"license: {json.dumps(license)}", "library_name: open_clip",
            "pipeline_tag: zero-shot-image-classification", "tags:", _yaml_list(TAGS).rstrip("\n")]
    if ds:
        meta += ["datasets:", _yaml_list(ds).rstrip("\n")]
    if base_model:
        meta += [f"base_model: {json.dumps(base_model)}"]
    size = sum(p.stat().st_size for p in staged.files.values())
    lines = ["---", *meta, "---", "", f"# {name}", "",
             f"An EVA-CLIP model ({_params(stats['total'])} parameters) in open_clip's layout "
             f"(`{CONFIG_NAME}` + safetensors), pushed with [evaclip](https://pypi.org/project/evaclip/) "
             f"{__version__}.", "",
             "## Model", "", _table(_architecture_rows(cfg, stats)), "",
             "## How to use", "", "### open_clip", "",
             "The vision tower is a timm EVA model described by `timm_model_kwargs` in the config; importing "
             "`evaclip_cli` first registers it with timm and open_clip (and loads sharded weights).", "",
             "```python", "import evaclip_cli  # noqa: F401  (pip install evaclip)", "import open_clip",
             "import torch", "from PIL import Image", "",
             f'model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:{repo_id}")',
             f'tokenizer = open_clip.get_tokenizer("hf-hub:{repo_id}")', "model.eval()", "",
             'image = preprocess(Image.open("cat.jpg")).unsqueeze(0)',
             'text = tokenizer(["a photo of a cat", "a photo of a dog"])',
             "with torch.no_grad():",
             "    img = model.encode_image(image)",
             "    txt = model.encode_text(text)",
             "    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)",
             "    probs = (100.0 * img @ txt.T).softmax(dim=-1)", "print(probs)", "```", "",
             "### evaclip", "", "```bash", "pip install evaclip",
             f"hf download {repo_id} --local-dir {name}            # an open_clip folder",
             f"evaclip eval suite --model {name} --root DATASETS     # the paper's 27-dataset zero-shot suite",
             f"evaclip eval zeroshot --model {name} --dataset IMAGENET_VAL --name imagenet1k",
             f"evaclip convert {name} {name}.pt --to eva            # the EVA-CLIP reference layout",
             "```", ""]
    if staged.run_dir is not None:
        from evaclip_cli.eval.report import read_recipe

        summary = training_summary(staged.run_dir)
        stage_cmd = {"video": "finetune-video"}.get(read_recipe(staged.run_dir).get("stage", "train"),
                                                    read_recipe(staged.run_dir).get("stage", "train"))
        if summary:
            lines += ["## Training", "", f"Trained with `evaclip {stage_cmd}` (DeepSpeed); from the run's "
                      "`evaclip_recipe.toml` and `metrics.jsonl`:", "", summary.rstrip(), ""]
    if results:
        lines += ["## Evaluation", "", results_markdown(results).rstrip(), ""]
    file_rows = [[f"`{n}`", format_size(p.stat().st_size, 2)] for n, p in sorted(staged.files.items())]
    lines += ["## Files", "", _table(file_rows, ("file", "size")), "",
              f"{len(staged.files)} files, {format_size(size, 2)} in all.", ""]
    return "\n".join(lines)
