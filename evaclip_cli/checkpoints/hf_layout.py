"""BAAI's transformers remote-code layout (the ``config.json`` + shards of BAAI/EVA-CLIP-8B, -8B-448, -18B), both ways.

A folder is in this layout when its ``config.json`` is BAAI's ``EvaCLIPConfig`` (``vision_config``/``text_config``
and an ``auto_map`` to ``configuration_evaclip``/``modeling_evaclip``, ``model_type`` "clip" or "evaclip"). Its
weights are one file or shards with an index, in any of the names transformers writes:
``model.safetensors``, ``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``,
``pytorch_model.bin``, ``pytorch_model-0000N-of-0000M.bin`` + ``pytorch_model.bin.index.json``.

Reading is memory-mapped (nothing is copied until a writer asks for a tensor); the key maps live beside the models
(``models.keymaps.hf_to_open_clip`` / ``open_clip_to_hf``), the architecture comes from ``config.json`` alone
(``models.specs.spec_from_hf_config``), so any size converts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from evaclip_cli.errors import UserError

CONFIG = "config.json"
# (weights file, index) in the order they are preferred when a folder holds several
WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))
HF_INDEX_NAME = "model.safetensors.index.json"
HF_WEIGHTS_NAME = "model.safetensors"


def read_config(folder: Path) -> Optional[dict]:
    """``config.json`` of ``folder`` if it is BAAI's EvaCLIPConfig, else None."""
    from evaclip_cli.models.specs import is_hf_config

    try:
        cfg = json.loads((Path(folder) / CONFIG).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return cfg if is_hf_config(cfg) else None


def is_hf_dir(path: Path) -> bool:
    return Path(path).is_dir() and read_config(path) is not None


def hf_config_for_file(path: Path) -> Optional[dict]:
    """The BAAI config.json beside a single weights file, if there is one (a file taken out of such a repo)."""
    return read_config(Path(path).parent)


def spec_of(folder: Path):
    """The ClipSpec a BAAI folder's config.json describes."""
    from evaclip_cli.checkpoints.io import read_json
    from evaclip_cli.models.specs import spec_from_hf_config

    path = Path(folder) / CONFIG
    return spec_from_hf_config(read_json(path, "BAAI EvaCLIP config"), where=str(path))


def weight_files(folder: Path) -> tuple[Path, list[Path]]:
    """(what to load: a weights file or an index, the files it takes) for a BAAI folder."""
    folder = Path(folder)
    for single, index in WEIGHT_FILES:
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise UserError(f"{folder / index}: not a weights index (no weight_map)") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise UserError(f"{folder}: the index names shard(s) that are not there: {', '.join(missing[:3])}; "
                                "copy or download the whole folder")
            return folder / index, [folder / s for s in shards]
        if (folder / single).is_file():
            return folder / single, [folder / single]
    names = ", ".join(a for pair in WEIGHT_FILES for a in pair)
    raise UserError(f"{folder}: a BAAI EVA-CLIP config.json without weights (looked for {names})")


def load_hf_state(folder: Path) -> dict:
    """The raw BAAI state dict of a folder (memory-mapped: .safetensors via mmap, .bin via torch.load(mmap=True))."""
    from evaclip_cli.checkpoints.io import load_state_dict

    main, files = weight_files(folder)
    if main.name.endswith(".safetensors.index.json"):
        return load_state_dict(main)
    if main.name.endswith(".bin.index.json"):
        state: dict = {}
        for f in files:
            state.update(load_state_dict(f))
        try:
            listed = set(json.loads(main.read_text())["weight_map"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            listed = set()
        missing = listed - set(state)
        if missing:
            raise UserError(f"{main}: {len(missing)} tensors listed in the index are in no shard "
                            f"(first: {sorted(missing)[0]})")
        return state
    return load_state_dict(main)


def read_hf(folder: Path, separate_qkv: bool = False, notes: Optional[list] = None) -> dict:
    """A BAAI folder -> state dict in evaclip's open_clip layout (q/k/v fused lazily); notes for the user appended to
    ``notes``."""
    from evaclip_cli.models.keymaps import hf_to_open_clip

    state, said = hf_to_open_clip(load_hf_state(folder), separate_qkv)
    if notes is not None:
        notes.extend(said)
    return state


def write_hf_folder(state: dict, spec, dst: Path, dtype: Optional[str] = None, max_shard_size: str | int = "5GB",
                    force: bool = False, notes: Optional[list] = None) -> list[str]:
    """BAAI's layout from an open_clip-layout state dict: ``config.json`` (every architecture field, ``auto_map`` to
    BAAI's remote code on the Hub) + ``model.safetensors`` or shards + ``model.safetensors.index.json``."""
    from evaclip_cli.atomic import AtomicDir
    from evaclip_cli.checkpoints.io import parse_size, save_safetensors_sharded, torch_dtype
    from evaclip_cli.models.keymaps import open_clip_to_hf
    from evaclip_cli.models.specs import hf_config_from_spec

    if not any(k.startswith("text.") for k in state):
        raise UserError("--to hf writes a whole CLIP (BAAI's EvaCLIPModel); this checkpoint has no text tower")
    cfg = hf_config_from_spec(spec)
    out, said = open_clip_to_hf(state)
    if notes is not None:
        notes.extend(said)
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    td = torch_dtype(dtype)
    if td is not None:
        cfg["torch_dtype"] = str(td).replace("torch.", "")
    else:
        cfg["torch_dtype"] = str(next(iter(out.values())).dtype).replace("torch.", "")
    with AtomicDir(dst, force) as tmp:
        files = save_safetensors_sharded(out, tmp, HF_WEIGHTS_NAME, HF_INDEX_NAME, limit, td)
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    return [CONFIG, *files]
