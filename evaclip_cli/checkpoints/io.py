"""Reading and writing checkpoint files: any supported file -> a flat state dict (memory-mapped where the format
allows), sizes, dtypes, and sharded safetensors (the Hub's convention: shards + an index).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from evaclip_cli.errors import UserError, first_line
from evaclip_cli.models.openclip_compat import load_sharded_safetensors

__all__ = ["load_state_dict", "load_sharded_safetensors", "unwrap", "read_json", "parse_size", "torch_dtype", "cast",
           "save_safetensors_sharded"]

WRAPPERS = ("module", "state_dict", "model")
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_state_dict(path: str | Path, mmap: bool = True) -> dict:
    """Load any supported file into a flat ``{key: tensor}`` (memory-mapped where the format allows)."""
    import torch

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; expected a checkpoint file (.pt/.pth/.bin/.safetensors)")
    name = path.name
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file (0 bytes); the download or copy did not finish: fetch it again")
    try:
        if name.endswith(".safetensors.index.json"):
            obj = load_sharded_safetensors(path)
        elif name.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if "mmap" in str(e) or "zip" in str(e).lower():  # legacy (non-zip) pickles cannot be mapped
                    obj = torch.load(str(path), map_location="cpu", weights_only=True)
                else:
                    raise
    except UserError:
        raise
    except Exception as e:  # corrupt/truncated file, wrong format
        raise UserError(f"{path}: cannot read as a checkpoint ({type(e).__name__}: {first_line(e)}); is the file "
                        "complete?") from None
    return unwrap(obj, where=str(path))


def unwrap(obj, where: str = "checkpoint") -> dict:
    import torch

    depth = 0
    while isinstance(obj, dict) and depth < 3 and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPERS if k in obj and isinstance(obj[k], dict)), None)
        if inner is None:
            break
        obj, depth = inner, depth + 1
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{where}: no state dict found (expected tensors, possibly under 'module'/'state_dict'/'model')")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise UserError(f"{where}: holds no tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno})") from None


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20, '0' -> 0 (no sharding)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", str(text), flags=re.I)
    if not m:
        raise UserError(f"--max-shard-size '{text}' is not a size (e.g. 5GB, 500MB, 2GiB, 0 for one file)")
    num, unit = float(m.group(1)), (m.group(2) or "").upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1] if unit else ""]
    return int(num * base**power)


def torch_dtype(name: Optional[str]):
    import torch

    return None if name in (None, "auto") else getattr(torch, _DTYPES[name])


def cast(t, dtype):
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def save_safetensors_sharded(state: dict, folder: Path, weights_name: str, index_name: str, max_shard_bytes: int,
                             dtype=None, metadata: Optional[dict] = None) -> list[str]:
    """Write ``state`` as one safetensors file, or as shards + an index (the Hub's convention) above the limit."""
    from safetensors.torch import save_file

    import torch

    sizes = {k: v.numel() * (v.element_size() if dtype is None or not v.is_floating_point()
                             else torch.empty((), dtype=dtype).element_size()) for k, v in state.items()}
    total = sum(sizes.values())
    groups: list[list[str]] = [[]]
    acc = 0
    for k in state:
        if max_shard_bytes and groups[-1] and acc + sizes[k] > max_shard_bytes:
            groups.append([])
            acc = 0
        groups[-1].append(k)
        acc += sizes[k]
    meta = {"format": "pt", **(metadata or {})}
    if len(groups) == 1:
        save_file({k: cast(state[k], dtype) for k in groups[0]}, str(folder / weights_name), metadata=meta)
        return [weights_name]
    stem = weights_name[: -len(".safetensors")]
    names, weight_map = [], {}
    for i, keys in enumerate(groups, 1):
        name = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: cast(state[k], dtype) for k in keys}, str(folder / name), metadata=meta)
        names.append(name)
        weight_map.update({k: name for k in keys})
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
    return [*names, index_name]
