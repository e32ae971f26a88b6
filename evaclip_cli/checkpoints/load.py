"""Load any CLIP a user points evaclip at, for evaluation: one function, every source ``convert`` reads.

``load_clip(M)`` accepts
  * an open_clip folder (``open_clip_config.json`` + safetensors, sharded or not) — loaded by open_clip itself
    (``local-dir:``), so a folder from the Hub or from ``evaclip convert`` behaves the same;
  * an evaclip run folder (``runs/x``: its ``final/`` folder, else the newest DeepSpeed checkpoint) or a DeepSpeed
    checkpoint folder (ZeRO 0-3, consolidated on the fly; architecture from the run's recipe);
  * an EVA reference ``.pt``/``.bin``/``.safetensors`` with ``eva_config`` (the reference repo's JSON) or a released
    name (``EVA-CLIP-18B``) as ``arch``;
  * BAAI's transformers remote-code folder (``config.json`` + shards of BAAI/EVA-CLIP-8B, -18B): the architecture
    from its config.json;
  * an open_clip model name (``ViT-B-32``, or a released EVA name) with ``pretrained`` = a local weights file;
  * a Hub source: ``hf-hub:OWNER/NAME[/FILE][@REV]`` or a released name (``EVA-CLIP-8B``) without ``pretrained``,
    fetched into huggingface_hub's cache first (``checkpoints.hub_source``), then loaded as above;
  * an open_clip pretrained tag: ``open_clip:MODEL/TAG``, ``MODEL:TAG``, or ``MODEL`` with ``pretrained`` = ``TAG``
    (open_clip's own ``--model M --pretrained TAG``): the weights its registry names, fetched the same way, built
    by open_clip with the tag's preprocessing.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

from evaclip_cli.errors import UserError
from evaclip_cli.models.loaded import OPENAI_MEAN, OPENAI_STD, LoadedClip


def _run_source(path: Path) -> Path:
    """A run folder -> its consolidated final/ folder, else its checkpoints/ folder."""
    from evaclip_cli.checkpoints.deepspeed import is_deepspeed_dir
    from evaclip_cli.models.openclip_compat import CONFIG_NAME

    if (path / "final" / CONFIG_NAME).is_file():
        return path / "final"
    if (path / "checkpoints").is_dir() and is_deepspeed_dir(path / "checkpoints"):
        return path / "checkpoints"
    return path


def _from_open_clip_folder(path: Path, device: str) -> LoadedClip:
    import open_clip

    from evaclip_cli.checkpoints.io import read_json
    from evaclip_cli.models.openclip_compat import CONFIG_NAME, integrate
    from evaclip_cli.models.specs import spec_from_open_clip_cfg

    integrate()  # timm towers, timm_model_kwargs, sharded folders

    cfg = read_json(path / CONFIG_NAME, "open_clip config")
    try:
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path}: open_clip cannot load this folder ({type(e).__name__}: {str(e)[:200]})") from e
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    pp = cfg.get("preprocess_cfg", {})
    try:
        spec = spec_from_open_clip_cfg(cfg)
    except Exception:
        spec = None  # any open_clip model: fine for evaluation
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return LoadedClip(model=model.eval(), tokenize=tokenizer, image_size=size, name=path.name, spec=spec,
                      mean=tuple(pp.get("mean", OPENAI_MEAN)), std=tuple(pp.get("std", OPENAI_STD)),
                      source="open_clip")


def _from_state(state: dict, spec, device: str, name: str, source: str) -> LoadedClip:
    from open_clip.tokenizer import tokenize

    from evaclip_cli.checkpoints.convert import expected_state, fit_to_expected
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.lazy import materialize_state

    state = materialize_state(fit_to_expected(state, expected_state(spec), name, vision_only=False))
    model = build_clip(spec)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("attn_mask")]
    if missing:
        raise UserError(f"{name}: {len(missing)} tensors missing for the model (first: {missing[0]}); is it a vision-"
                        "only checkpoint? `evaclip eval` needs both towers")
    ctx = spec.text.context_length
    return LoadedClip(model=model.to(device).eval(), tokenize=functools.partial(tokenize, context_length=ctx),
                      image_size=spec.vision.image_size, name=name, spec=spec, source=source)


def load_clip(model: str, device: str = "cpu", eva_config: Optional[str] = None, pretrained: Optional[str] = None,
              arch: Optional[str] = None) -> LoadedClip:
    from evaclip_cli.checkpoints.hub_source import is_hub_source, resolve_source

    tag = _open_clip_tag(model, pretrained)
    if tag is not None:
        return _from_open_clip_tag(*tag, device)
    if pretrained is not None and not Path(pretrained).exists() and str(pretrained).startswith("hf-hub:"):
        pretrained = str(resolve_source(pretrained).path)
    if pretrained is None and not Path(model).exists() and is_hub_source(model):
        got = resolve_source(model)
        loaded = _load_local(str(got.path), device, eva_config, None, arch or (got.arch if not eva_config else None))
        loaded.name = model.split("/")[-1] if model.startswith("hf-hub:") else model
        loaded.extra["resolved"] = str(got.path)  # the cache snapshot (its path names the commit): a fingerprint
        return loaded
    return _load_local(model, device, eva_config, pretrained, arch)


def _open_clip_tag(model: str, pretrained: Optional[str]) -> Optional[tuple[str, str]]:
    """(MODEL, TAG) when the model is named by an open_clip pretrained tag, in any of its three spellings."""
    from evaclip_cli.checkpoints.hub_source import WEIGHT_SUFFIXES
    from evaclip_cli.models.specs import parse_open_clip_tag

    if pretrained is None:
        return None if Path(model).exists() else parse_open_clip_tag(model)
    p = str(pretrained)
    if Path(p).exists() or p.startswith("hf-hub:") or "/" in p or p.endswith(WEIGHT_SUFFIXES) or Path(model).exists():
        return None
    return model, p


def _from_open_clip_tag(model: str, tag: str, device: str) -> LoadedClip:
    from open_clip import pretrained as registry

    from evaclip_cli.checkpoints.hub_source import resolve_source

    got = resolve_source(f"open_clip:{model}/{tag}")
    loaded = _open_clip_named(model, got.path, device, registry.get_pretrained_cfg(model, tag))
    loaded.name = f"{model}/{tag}"
    loaded.extra["resolved"] = str(got.path)
    return loaded


def _load_local(model: str, device: str, eva_config: Optional[str], pretrained: Optional[str],
                arch: Optional[str]) -> LoadedClip:
    from evaclip_cli.checkpoints.convert import load_source
    from evaclip_cli.checkpoints.detect import detect_format, resolve_spec

    path = Path(model)
    if path.exists() and pretrained is None:
        if path.is_dir():
            path = _run_source(path)
        fmt = detect_format(path, "auto")
        if fmt == "open_clip":
            return _from_open_clip_folder(path, device)
        if fmt == "timm":
            raise UserError(f"{path}: a vision-tower folder (e.g. a MIM student) has no text tower; zero-shot "
                            "evaluation needs a CLIP (train it with `evaclip train`)")
        spec = resolve_spec(path, fmt, Path(eva_config) if eva_config else None, arch, None)
        state, _, layout = load_source(path, fmt, spec)
        if layout in ("mim", "open_clip_visual"):
            raise UserError(f"{path}: a vision-only checkpoint ({layout}); zero-shot evaluation needs both towers")
        run = path.parent.name if fmt == "deepspeed" and path.name == "checkpoints" else path.stem
        return _from_state(state, spec, device, run or str(path), fmt)
    if pretrained is None:
        raise UserError(f"{model}: no such file or folder (give an open_clip folder, a run folder, a DeepSpeed "
                        "checkpoint, BAAI's HF folder, an EVA .pt with --eva-config, hf-hub:OWNER/NAME[/FILE], a "
                        "released name such as EVA-CLIP-8B, or a model name with --pretrained FILE)")
    weights = Path(pretrained)
    if not weights.is_file():
        raise UserError(f"{pretrained}: weights file not found (give a local file or hf-hub:OWNER/NAME/FILE)")
    from evaclip_cli.models.specs import ALIASES, ARCHS, RELEASED

    if model in ALIASES or model in ARCHS or model in RELEASED:  # a released EVA name + the reference .pt
        spec = resolve_spec(weights, detect_format(weights, "auto"), Path(eva_config) if eva_config else None,
                            model, None)
        state, _, _ = load_source(weights, "eva", spec)
        return _from_state(state, spec, device, model, "eva")
    return _open_clip_named(model, weights, device)


def _open_clip_named(model: str, weights: Path, device: str, pretrained_cfg: Optional[dict] = None) -> LoadedClip:
    """open_clip's model ``model`` with the weights file; a registry tag's preprocessing (mean, std,
    interpolation, resize mode) when ``pretrained_cfg`` is given, as open_clip applies it for the tag."""
    import open_clip

    from evaclip_cli.models.openclip_compat import integrate
    from evaclip_cli.models.specs import ALIASES

    integrate()
    if model not in open_clip.list_models():
        raise UserError(f"{model}: not an open_clip model name (see open_clip.list_models()) nor an evaclip model "
                        f"({', '.join(sorted(ALIASES))})")
    keys = ("mean", "std", "interpolation", "resize_mode")
    pp: dict = {f"image_{k}": pretrained_cfg[k] for k in keys if pretrained_cfg and pretrained_cfg.get(k)}
    if pretrained_cfg and pretrained_cfg.get("quick_gelu"):  # as open_clip builds the tag (a file alone does not say)
        pp["force_quick_gelu"] = True
    try:
        m, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=str(weights), device=device, **pp)
    except RuntimeError as e:
        raise UserError(f"{weights}: does not load into open_clip's {model} ({str(e)[:200]})") from e
    size = m.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = getattr(m.visual, "image_mean", None) or OPENAI_MEAN
    std = getattr(m.visual, "image_std", None) or OPENAI_STD
    return LoadedClip(model=m.eval(), tokenize=open_clip.get_tokenizer(model), image_size=size, name=model,
                      mean=tuple(mean), std=tuple(std), source="open_clip-name")
