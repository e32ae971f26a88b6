"""DeepSpeed checkpoint folders (ZeRO 0-3, any world size) -> one fp32 state dict, streamed from the ranks' files.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from evaclip_cli.checkpoints.io import load_state_dict
from evaclip_cli.errors import UserError, first_line
from evaclip_cli.models.lazy import LazyTensor


def is_deepspeed_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    if (path / "latest").is_file() or any(path.glob("global_step*")):
        return True
    return any(path.glob("*mp_rank_*_model_states.pt"))


def _deepspeed_tag_dir(path: Path) -> tuple[Path, str]:
    """(checkpoint root, tag) for a DeepSpeed folder given as the root or as one tag folder."""
    if any(path.glob("*mp_rank_*_model_states.pt")):
        return path.parent, path.name
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    tags = sorted(path.glob("global_step*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    if not tags:
        raise UserError(f"{path}: no DeepSpeed checkpoint (no 'latest' file, no global_step* folders)")
    return path, tags[-1].name


def load_deepspeed_state(path: Path) -> dict:
    """The fp32 model of a DeepSpeed checkpoint folder (ZeRO 0-3, any world size), as ``{name: tensor}``.

    ZeRO 1-3: streamed. Every rank's files are memory-mapped and only the fp32 master partitions are ever read (the
    optimizer moments, twice the model, are never touched); each parameter is a :class:`ZeroParam` gathered from the
    ranks' partitions when a writer or a loader asks for it. Converting an 18B checkpoint therefore needs one tensor
    of memory, not the fp32 model plus every rank's optimizer partition (what DeepSpeed's ``zero_to_fp32`` loads)."""
    root, tag = _deepspeed_tag_dir(path)
    tag_dir = root / tag
    if not tag_dir.is_dir():
        raise UserError(f"{root}: 'latest' names tag '{tag}', but {tag_dir} does not exist")
    optim_files = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"), key=_rank_of)
    if optim_files:
        return _read_zero(tag_dir, optim_files)
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise UserError(f"{tag_dir}: no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint?)")
    if len(files) > 1:
        raise UserError(f"{tag_dir}: {len(files)} model-parallel ranks; evaclip writes data-parallel checkpoints only")
    import torch

    state = load_state_dict(files[0])
    floats = [t for t in state.values() if t.is_floating_point()]
    if floats and all(t.dtype in (torch.bfloat16, torch.float16) for t in floats):
        state = _stage0_fp32_masters(files[0], state)
    return state


# ------------------------------------------------------------------------------------------ ZeRO 1-3, streamed
# DeepSpeed's checkpoint protocol (deepspeed/checkpoint/constants.py, runtime/zero/stage3.py, stage_1_and_2.py):
#  * zero_pp_rank_R_mp_rank_00_optim_states.pt, one per data-parallel rank R: ``optimizer_state_dict`` holds
#    ``zero_stage``, ``partition_count`` (the world size) and that rank's fp32 masters, flat:
#      ZeRO 1/2 ``single_partition_of_fp32_groups``: per param group, rank R's contiguous 1/world slice of the group's
#               flat vector (params back to back, each followed by ``param_alignment_paddings`` where recorded);
#      ZeRO 3   ``fp32_flat_groups``: per sub-group, rank R's partition of every parameter back to back, where a
#               parameter of n elements has a partition of ceil(n / world) on every rank (the last one padded).
#  * ..._model_states.pt (one per rank under ZeRO 3, one in all under ZeRO 1/2): ``param_shapes`` (per group, name ->
#    shape, in flat order), ``buffer_names`` + ``module`` (the buffers), ``shared_params`` (alias -> name),
#    ``frozen_param_shapes`` + ``frozen_param_fragments`` (parameters outside the optimizer: whole under ZeRO 1/2,
#    each rank's partition under ZeRO 3).
_OPTIM = "optimizer_state_dict"


class C:
    """The key names of deepspeed/checkpoint/constants.py (spelled here: reading a checkpoint must not pay DeepSpeed's
    import, seconds and an accelerator probe)."""
    ZERO_STAGE = "zero_stage"
    PARTITION_COUNT = "partition_count"
    FP32_FLAT_GROUPS = "fp32_flat_groups"
    SINGLE_PARTITION_OF_FP32_GROUPS = "single_partition_of_fp32_groups"
    PARAM_ALIGNMENT_PADDINGS = "param_alignment_paddings"
    PARAM_SHAPES = "param_shapes"
    BUFFER_NAMES = "buffer_names"
    FROZEN_PARAM_SHAPES = "frozen_param_shapes"
    FROZEN_PARAM_FRAGMENTS = "frozen_param_fragments"


def _rank_of(f: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_", f.name)
    return int(m.group(1)) if m else -1


def _mp_rank_of(f: Path) -> int:
    m = re.search(r"mp_rank_(\d+)_", f.name)
    return int(m.group(1)) if m else 0


def _load_mapped(f: Path, tag_dir: Path):
    """A DeepSpeed file with every tensor memory-mapped (nothing is read until used). DeepSpeed's files pickle its
    own objects (config, loss scaler), so ``weights_only`` cannot be used: only open checkpoints you trust, as with
    DeepSpeed's own loader."""
    import torch

    try:
        return torch.load(str(f), map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:
        raise UserError(f"{f}: cannot read this DeepSpeed file ({type(e).__name__}: {first_line(e)}); is the "
                        f"checkpoint {tag_dir.name} complete?") from None


class ZeroParam(LazyTensor):
    """One parameter of a ZeRO checkpoint: ``pieces`` are (rank's flat fp32 tensor, start, length), in order; their
    concatenation, cut to the parameter's size, is the parameter. Copied out of the memory-mapped files only when
    materialised."""

    def __init__(self, pieces: list, shape):
        import torch

        self.pieces, self.shape = pieces, torch.Size(shape)
        self.dtype = pieces[0][0].dtype if pieces else torch.float32

    def materialize(self):
        import torch

        n = self.numel()
        if not self.pieces or n == 0:
            return torch.zeros(self.shape, dtype=self.dtype)
        with torch.no_grad():  # DeepSpeed saves its flat partitions as tensors that require grad
            flat = torch.cat([t.detach().narrow(0, start, length) for t, start, length in self.pieces])
        return (flat if flat.numel() == n else flat[:n].clone()).view(self.shape)


def _slices(flats: list, starts: list, offset: int, length: int) -> list:
    """(tensor, start, length) pieces of the virtual concatenation of ``flats`` (starting at ``starts``) that cover
    [offset, offset + length)."""
    out, end = [], offset + length
    for t, s in zip(flats, starts):
        e = s + t.numel()
        lo, hi = max(offset, s), min(end, e)
        if lo < hi:
            out.append((t, lo - s, hi - lo))
    return out


def _starts(flats: list) -> list:
    starts, acc = [], 0
    for t in flats:
        starts.append(acc)
        acc += t.numel()
    return starts


def _read_zero(tag_dir: Path, optim_files: list) -> dict:
    """A ZeRO 1-3 checkpoint as ``{name: ZeroParam or buffer}``: the ranks' fp32 partitions, the parameters mapped
    onto them, then the buffers, frozen parameters and shared aliases of the model states."""
    if len({_mp_rank_of(f) for f in optim_files}) > 1:
        raise UserError(f"{tag_dir}: several model-parallel ranks; evaclip writes data-parallel checkpoints only")
    stage, world, flats, paddings = _zero_partitions(tag_dir, optim_files)
    models = _zero_model_states(tag_dir, stage, world)
    meta = models[0]
    state = _zero_buffers(meta)
    state.update(_zero_frozen(meta, models, stage))
    where = f"{tag_dir}: the ZeRO-{stage} partitions do not match the checkpoint's parameter shapes"
    if stage == 3:
        state.update(_zero3_params(meta, flats, world, where))
    else:
        state.update(_zero12_params(meta, flats, world, paddings, where))
    for alias, name in (meta.get("shared_params") or {}).items():
        if name in state:
            state[alias] = state[name]
    return state


def _zero_partitions(tag_dir: Path, optim_files: list) -> tuple[int, int, list, Optional[list]]:
    """(ZeRO stage, world size, each rank's list of flat fp32 tensors, ZeRO 1/2's alignment paddings) from the
    ranks' optimizer files (memory-mapped: only the fp32 partitions are ever read)."""
    optim = []
    for f in optim_files:
        sd = _load_mapped(f, tag_dir).get(_OPTIM)
        if not isinstance(sd, dict):
            raise UserError(f"{f}: no {_OPTIM} (not a DeepSpeed ZeRO optimizer file?)")
        optim.append(sd)
    first = optim[0]
    stage = _zero_stage(first, optim_files[0])
    world = _zero_world(first, len(optim), tag_dir, optim_files)
    key = C.FP32_FLAT_GROUPS if stage == 3 else C.SINGLE_PARTITION_OF_FP32_GROUPS
    flats = []
    for f, sd in zip(optim_files, optim):
        groups = sd.get(key)
        if groups is None:
            raise UserError(f"{f}: no {key} (ZeRO stage {stage}); is the checkpoint complete?")
        flats.append(list(groups) if isinstance(groups, (list, tuple)) else [groups])
    return stage, world, flats, first.get(C.PARAM_ALIGNMENT_PADDINGS)


def _zero_stage(first: dict, f: Path) -> int:
    if C.ZERO_STAGE in first:
        return int(first[C.ZERO_STAGE])
    if C.SINGLE_PARTITION_OF_FP32_GROUPS in first:  # DeepSpeed's BF16_Optimizer (bf16 + ZeRO 1) has no stage key
        return 1
    raise UserError(f"{f}: not a ZeRO checkpoint (no {C.ZERO_STAGE})")


def _zero_world(first: dict, files: int, tag_dir: Path, optim_files: list) -> int:
    """The world size that wrote the checkpoint; every rank's optimizer file must be there."""
    world = first.get(C.PARTITION_COUNT, files)
    world = max(world) if isinstance(world, (list, tuple)) else int(world)
    ranks = [_rank_of(f) for f in optim_files]
    if ranks != list(range(world)):
        raise UserError(f"{tag_dir}: the checkpoint was written by {world} processes, but the optimizer files are "
                        f"for ranks {ranks[:8]}{'...' if len(ranks) > 8 else ''}; copy the whole folder, or resume "
                        "from the last complete checkpoint")
    return world


def _zero_model_states(tag_dir: Path, stage: int, world: int) -> list:
    """The model-state files that matter (every rank's under ZeRO 3, the one file under ZeRO 1/2), memory-mapped;
    the first holds the parameter shapes and buffers."""
    if stage == 3:
        model_files = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_*_model_states.pt"), key=_rank_of)
        if len(model_files) != world:
            raise UserError(f"{tag_dir}: {len(model_files)} model-state files for {world} ranks; is the checkpoint "
                            "complete?")
    else:
        model_files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not model_files:
            raise UserError(f"{tag_dir}: no mp_rank_*_model_states.pt; is the checkpoint complete?")
    models = [_load_mapped(f, tag_dir) for f in (model_files if stage == 3 else model_files[:1])]
    if C.PARAM_SHAPES not in models[0] or C.BUFFER_NAMES not in models[0]:
        raise UserError(f"{model_files[0]}: no {C.PARAM_SHAPES}/{C.BUFFER_NAMES} (not a DeepSpeed ZeRO checkpoint?)")
    return models


def _zero_buffers(meta: dict) -> dict:
    module = meta.get("module") or {}
    state: dict = {}
    for name in meta[C.BUFFER_NAMES]:
        if name in module:
            t = module[name]
            state[name] = t.float() if t.is_floating_point() else t.clone()
    return state


def _zero_frozen(meta: dict, models: list, stage: int) -> dict:
    """Parameters outside the optimizer: whole in the one model file under ZeRO 1/2, partitioned under ZeRO 3."""
    import math

    state: dict = {}
    for name, shape in (meta.get(C.FROZEN_PARAM_SHAPES) or {}).items():
        if stage == 3:
            frags = [m[C.FROZEN_PARAM_FRAGMENTS][name].reshape(-1) for m in models]
            state[name] = ZeroParam(_slices(frags, _starts(frags), 0, math.prod(shape)), shape)
        else:
            frag = meta[C.FROZEN_PARAM_FRAGMENTS][name].reshape(-1)
            state[name] = ZeroParam([(frag, 0, frag.numel())], shape)
    return state


def _zero3_params(meta: dict, flats: list, world: int, where: str) -> dict:
    """ZeRO 3: every parameter has a ceil(n / world) partition on each rank, the partitions back to back."""
    import math

    shapes = {k: v for group in meta[C.PARAM_SHAPES] for k, v in group.items()}
    per_rank = [_starts(fl) for fl in flats]
    state, offset = {}, 0
    for name, shape in shapes.items():
        part = math.ceil(math.prod(shape) / world)
        pieces = [p for r in range(world) for p in _slices(flats[r], per_rank[r], offset, part)]
        state[name] = ZeroParam(pieces, shape)
        offset += part
    if any(offset != sum(t.numel() for t in fl) for fl in flats):
        raise UserError(f"{where} (used {offset} elements per rank of {sum(t.numel() for t in flats[0])})")
    return state


def _zero12_params(meta: dict, flats: list, world: int, paddings: Optional[list], where: str) -> dict:
    """ZeRO 1/2: per param group, the ranks' slices concatenated are the group's flat vector, params back to back
    (each followed by its alignment padding where recorded)."""
    import math

    state = {}
    for g, shapes in enumerate(meta[C.PARAM_SHAPES]):
        group = [flats[r][g] for r in range(world)]
        starts, total = _starts(group), sum(t.numel() for t in group)
        pads = paddings[g] if paddings is not None else None
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            n = math.prod(shape)
            if offset + n > total:
                raise UserError(f"{where} (group {g} holds {total} elements, '{name}' ends at {offset + n})")
            state[name] = ZeroParam(_slices(group, starts, offset, n), shape)
            offset += n + (int(pads[i]) if pads is not None else 0)
        align = 2 * world  # ZeRO 1/2 pad each group's flat vector to a multiple of 2 x world size
        if -(-offset // align) != -(-total // align):
            raise UserError(f"{where} (group {g}: {offset} of {total} elements used)")
    return state


def _stage0_fp32_masters(path: Path, state: dict) -> dict:
    """Without ZeRO, a bf16/fp16 run's module weights are the rounded 16-bit copies; the fp32 masters sit in the
    optimizer state as unnamed per-group lists. evaclip's checkpoints name them (client state
    ``param_group_names``); use them so the export is the fp32 model, not a widened 16-bit one."""
    import sys

    import torch

    # DeepSpeed's own file (its loader does the same)
    obj = torch.load(str(path), map_location="cpu", mmap=True, weights_only=False)
    groups = (obj.get("optimizer") or {}).get("fp32_groups")
    names = obj.get("param_group_names")
    if not groups or not names or len(groups) != len(names):
        print(f"evaclip: warning: {path} holds 16-bit weights without named fp32 masters; exporting the 16-bit "
              "weights", file=sys.stderr)
        return state
    out = dict(state)
    for group_names, tensors in zip(names, groups):
        for name, t in zip(group_names, tensors):
            if name in out:
                out[name] = t.detach().reshape(out[name].shape).float()
    return out
