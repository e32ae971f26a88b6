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

__all__ = ["load_state_dict", "load_sharded_safetensors", "unwrap", "read_json", "parse_size", "format_size",
           "torch_dtype", "cast", "save_safetensors_sharded", "write_safetensors", "write_torch_file",
           "load_safetensors_mmap",
           "load_sharded_safetensors_mmap"]

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
            obj = load_sharded_safetensors_mmap(path) if mmap else load_sharded_safetensors(path)
        elif name.endswith(".safetensors"):
            if mmap:
                obj = load_safetensors_mmap(path)
            else:
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
        raise UserError(f"{where}: no state dict found (expected tensors, possibly under "
                        "'module'/'state_dict'/'model')")
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


def format_size(n: float, digits: int = 1) -> str:
    """Bytes for people, in the decimal units ``parse_size`` reads: 950 -> '950 B', 1.5e9 -> '1.5 GB'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1000.0
    raise AssertionError("unreachable")


def torch_dtype(name: Optional[str]):
    import torch

    return None if name in (None, "auto") else getattr(torch, _DTYPES[name])


def cast(t, dtype):
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def save_safetensors_sharded(state: dict, folder: Path, weights_name: str, index_name: str, max_shard_bytes: int,
                             dtype=None, metadata: Optional[dict] = None) -> list[str]:
    """Write ``state`` as one safetensors file, or as shards + an index (the Hub's convention) above the limit.

    Streams: each shard is written tensor by tensor (:func:`write_safetensors`), so the memory a conversion needs is
    one tensor (cast to ``dtype``), not a shard or the model."""
    sizes = {k: v.numel() * _element_size(v, dtype) for k, v in state.items()}
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
        write_safetensors(folder / weights_name, {k: state[k] for k in groups[0]}, dtype, meta)
        return [weights_name]
    stem = weights_name[: -len(".safetensors")]
    names, weight_map = [], {}
    for i, keys in enumerate(groups, 1):
        name = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(folder / name, {k: state[k] for k in keys}, dtype, meta)
        names.append(name)
        weight_map.update({k: name for k in keys})
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
    return [*names, index_name]


# ------------------------------------------------------------------------------------ safetensors, streamed
_ST_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _st_code(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _ST_CODES:
        raise UserError(f"cannot write a {name} tensor to safetensors")
    return _ST_CODES[name]


def _element_size(t, dtype) -> int:
    import torch

    if dtype is not None and t.is_floating_point():
        return torch.empty((), dtype=dtype).element_size()
    return t.element_size()


def write_safetensors(path: Path, tensors: dict, dtype=None, metadata: Optional[dict] = None) -> None:
    """One safetensors file written tensor by tensor: the header is computed from shapes and dtypes, then each tensor
    (a tensor, a memory-mapped one, or a lazy one such as ``models.lazy.LazyCat``) is cast and written on its own,
    so at most one converted tensor is in memory. Tensors are laid out by element size, largest first (as the
    safetensors library does), so every tensor is aligned for memory-mapped reading."""
    import struct

    import torch

    from evaclip_cli.models.lazy import materialize

    order = sorted(tensors, key=lambda k: (-_element_size(tensors[k], dtype), k))
    header: dict = {}
    offset = 0
    for k in order:
        t = tensors[k]
        out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        n = t.numel() * _element_size(t, dtype)
        header[k] = {"dtype": _st_code(out_dtype), "shape": [int(d) for d in t.shape],
                     "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(a): str(b) for a, b in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in order:
            t = cast(materialize(tensors[k]), dtype)
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t


# the storage classes torch.save names in its pickle for each dtype (torch.storage's legacy map, which torch keeps
# for files written by any version)
_TORCH_STORAGES = {"float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
                   "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage",
                   "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}


def write_torch_file(path: Path, state: dict, dtype=None) -> None:
    """``torch.save(state, path)``'s file, written tensor by tensor: the same zip archive (``data.pkl``, the format
    records, ``data/N`` per tensor, 64-byte aligned, CRC32s), read by ``torch.load`` (``weights_only=True``,
    ``mmap=True``) like a file torch wrote. ``torch.save`` pickles the whole dict first and so needs every tensor at
    once; here the pickle refers to each tensor by number, and each tensor (a tensor, a memory-mapped one or a
    ``models.lazy.LazyTensor``) is materialised, cast to ``dtype`` (floating tensors) and written on its own, so at
    most one converted tensor is in memory (an 18B ``.pt`` needs one tensor, not the model). ``state``: a flat dict
    of tensors and plain values (numbers, strings). The archive is written by torch's own writer,
    ``torch._C.PyTorchFileWriter``, the class ``torch.save`` uses."""
    import collections
    import contextlib
    import io as _io
    import pickle

    import torch

    from evaclip_cli.models.lazy import LazyTensor

    tensors: list = []  # (value, dtype written): data/N is tensors[N]

    class _Storage:  # pickled as torch.save's persistent id of a storage
        def __init__(self, key: str, dtype, numel: int):
            self.key, self.dtype, self.numel = key, dtype, numel

    class _Tensor:  # pickled as torch.save pickles a contiguous tensor
        def __init__(self, storage: _Storage, shape: tuple):
            self.storage, self.shape = storage, shape

        def __reduce__(self):
            stride: list[int] = []
            n = 1
            for d in reversed(self.shape):
                stride.insert(0, n)
                n *= d
            return (torch._utils._rebuild_tensor_v2,
                    (self.storage, 0, self.shape, tuple(stride), False, collections.OrderedDict()))

    def stand_in(v):
        if not isinstance(v, (torch.Tensor, LazyTensor)):
            return v
        out = dtype if dtype is not None and v.is_floating_point() else v.dtype
        name = str(out).replace("torch.", "")
        if name not in _TORCH_STORAGES:
            raise UserError(f"cannot write a {name} tensor to a .pt file (write .safetensors)")
        tensors.append((v, out))
        return _Tensor(_Storage(str(len(tensors) - 1), out, v.numel()), tuple(int(d) for d in v.shape))

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                storage_type = getattr(torch, _TORCH_STORAGES[str(obj.dtype).replace("torch.", "")])
                return ("storage", storage_type, obj.key, "cpu", obj.numel)
            return None

    buf = _io.BytesIO()
    _Pickler(buf, protocol=2).dump({k: stand_in(v) for k, v in state.items()})
    writer = None
    try:
        writer = torch._C.PyTorchFileWriter(str(path))
        _write_torch_records(writer, buf.getvalue(), tensors)
    except RuntimeError as e:  # torch's C++ writer words a full disk as "unexpected pos": find the errno
        from evaclip_cli.atomic import write_failure

        if writer is not None:  # finish it here: its destructor would try, fail again and abort the process
            with contextlib.suppress(RuntimeError):
                writer.write_end_of_file()
        raise (write_failure(e, Path(path).parent) or e) from None


def _write_torch_records(writer, pickled: bytes, tensors: list) -> None:
    """The archive's records: the pickle, torch's format records, then each tensor's storage in order."""
    import sys

    from evaclip_cli.models.lazy import materialize

    for name, data in (("data.pkl", pickled), (".format_version", b"1"), (".storage_alignment", b"64"),
                       ("byteorder", sys.byteorder.encode())):
        writer.write_record(name, data, len(data))
    for i, (v, out) in enumerate(tensors):
        t = materialize(v).detach().to("cpu", out).contiguous()
        if t.storage_offset() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()  # a view (a memory-mapped file's tensor, a slice): the writer takes whole storages
        writer.write_record(f"data/{i}", t.untyped_storage() if t.numel() else b"", t.nbytes)
        del t
    writer.write_end_of_file()


def load_safetensors_mmap(path: str | Path) -> dict:
    """``{name: tensor}`` backed by a private memory map of the file: nothing is read until used, and the pages are
    the page cache's (file-backed), not the process's, whatever the installed safetensors version does."""
    import mmap
    import struct

    import torch

    path = Path(path)
    codes = {v: getattr(torch, k) for k, v in _ST_CODES.items()}
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file (too short); is the file complete?")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise UserError(f"{path}: not a safetensors file (header of {n} bytes); is the file complete?")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: not a safetensors file (unreadable header); is the file complete?") from None
        size = path.stat().st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = codes.get(info.get("dtype"))
        if dt is None:
            raise UserError(f"{path}: tensor '{name}' has dtype {info.get('dtype')}, which evaclip does not read")
        start, end = (int(x) for x in info["data_offsets"])
        shape = [int(d) for d in info["shape"]]
        if 8 + n + end > size:
            raise UserError(f"{path}: truncated ({size} bytes, tensor '{name}' ends at {8 + n + end}); fetch it again")
        elem = torch.empty((), dtype=dt).element_size()
        count = (end - start) // elem
        if count == 0:
            out[name] = torch.empty(shape, dtype=dt)
        elif (8 + n + start) % elem == 0 and mm is not None:
            out[name] = torch.frombuffer(mm, dtype=dt, count=count, offset=8 + n + start).reshape(shape)
        else:  # unaligned (not written by the safetensors library): copy this one
            assert mm is not None
            out[name] = torch.frombuffer(bytearray(mm[8 + n + start: 8 + n + end]), dtype=dt).reshape(shape)
    return out


def load_sharded_safetensors_mmap(index_path: str | Path) -> dict:
    """One state dict from a ``*.safetensors.index.json`` and the shards beside it, memory-mapped."""
    index_path = Path(index_path)
    index = read_json(index_path, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise UserError(f"{index_path}: not a safetensors index (no weight_map)")
    state: dict = {}
    for shard in sorted(set(weight_map.values())):
        if not (index_path.parent / shard).is_file():
            raise UserError(f"{index_path}: shard {shard} is missing; copy or download the whole folder")
        state.update(load_safetensors_mmap(index_path.parent / shard))
    missing = set(weight_map) - set(state)
    if missing:
        raise UserError(f"{index_path}: {len(missing)} tensors listed in the index are in no shard "
                        f"(first: {sorted(missing)[0]})")
    return state
