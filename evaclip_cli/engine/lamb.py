"""LAMB with per-tensor trust ratios that stay per tensor under DeepSpeed ZeRO 1/2/3.

Update rule: DeepSpeed's ``FusedLamb`` (``ops/csrc/lamb/fused_lamb_cuda_kernel.cu``), the optimizer behind the
``"LAMB"`` DeepSpeed config that the EVA-CLIP trainer used (bias_correction=True, max_coeff=10, min_coeff=0.01,
eps_inside_sqrt=False), applied to every original tensor::

    m = b1 m + (1-b1) g            v = b2 v + (1-b2) g^2
    u = m / (sqrt(v) + eps) + wd p                          (raw moments; eps_inside_sqrt: sqrt(v + eps))
    ratio = clamp(||p|| / ||u||, min_coeff, max_coeff)      (1 if either norm is 0)
    p -= step_size * ratio * u,    step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)

FusedLamb applies the bias correction as a step-size factor after the trust ratio. ``bias_correction="moments"``
selects the other common form (timm / apex FusedLAMB / the paper): ``u = m_hat / (sqrt(v_hat) + eps) + wd p`` and
``step_size = lr``; the two agree once ``1 - b^t`` is ~1. ``bias_correction=False`` uses neither. Every tensor gets
a trust ratio, no-decay ones too (FusedLamb does). Only ``lr``, ``betas``, ``eps``, ``weight_decay`` (and the
optional ``bias_correction``, ``max_coeff``, ``min_coeff``, ``eps_inside_sqrt``) are read from a param group; other
keys (``lr_scale``, ``name``, ...) are left alone. The step count is per tensor (as in FusedLamb and Adam): it
advances once per ``step()`` in which the tensor has a gradient, however DeepSpeed splits the work into sub-groups.

Under ZeRO, DeepSpeed hands the client optimizer flat fp32 partitions (stage 1/2: one per param group and rank;
stage 3: one per sub-group and rank, stepped once per sub-group; bf16 + stage 1 with fp32 gradient accumulation:
BF16_Optimizer, one per group and rank). A plain LAMB would take its trust ratio over a whole shard, and under
ZeRO-3 over uninitialised padding. ``attach_to_engine`` reads how DeepSpeed laid out each flat partition and gives
it a layout: the slices of the partition that belong to each original parameter, and the padding. ``step`` then
sums ||p||^2 and ||u||^2 per parameter over its slices, all-reduces the sums over the partition's process group,
and applies each parameter's ratio to its slices; padding is zeroed (weights, gradient, update) and never enters a
norm.

This reads DeepSpeed internals, verified on deepspeed 0.19.x (see ``SUPPORTED_DEEPSPEED``); ``attach_to_engine``
refuses other versions and checks what it reads against DeepSpeed's own bookkeeping. ``tests/test_lamb.py``
compares every ZeRO stage with this optimizer on the unpartitioned model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch.optim import Optimizer

SUPPORTED_DEEPSPEED = ("0.19.",)
_PAD = -1


@dataclass
class FlatLayout:
    """How one flat partition maps onto original parameters.

    ``lengths`` cover the partition in order; ``owners[k]`` is the index (the same on every rank) of the parameter
    that piece ``k`` belongs to, or -1 for padding. ``num_params`` is the number of such indices; ``group`` the
    process group over which the per-parameter sums are all-reduced (None: the default group; False: none).
    """

    lengths: list[int]
    owners: list[int]
    num_params: int
    group: object = False
    numel: int = 0
    real: list[int] = field(default_factory=list)
    pads: list[int] = field(default_factory=list)
    _index: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.lengths) != len(self.owners):
            raise ValueError("lengths and owners differ in length")
        if any(n < 0 for n in self.lengths):
            raise ValueError("negative piece length")
        if any(not (o == _PAD or 0 <= o < self.num_params) for o in self.owners):
            raise ValueError("owner index out of range")
        self.numel = sum(self.lengths)
        self.real = [k for k, o in enumerate(self.owners) if o != _PAD and self.lengths[k] > 0]
        self.pads = [k for k, o in enumerate(self.owners) if o == _PAD and self.lengths[k] > 0]
        seen = [self.owners[k] for k in self.real]
        if len(seen) != len(set(seen)):
            raise ValueError("a parameter owns more than one piece of one partition")

    def owner_index(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._index:
            self._index[key] = torch.tensor([self.owners[k] for k in self.real], dtype=torch.long, device=device)
        return self._index[key]

    @classmethod
    def from_ranges(cls, numel: int, ranges: Sequence[tuple[int, int, int]], num_params: int, group=False):
        """``ranges``: (start, length, owner) inside a partition of ``numel`` elements; the rest is padding."""
        lengths, owners, pos = [], [], 0
        for start, length, owner in sorted(ranges):
            if start < pos or start + length > numel:
                raise ValueError(f"piece ({start}, {length}) overlaps another or leaves the partition of {numel}")
            if start > pos:
                lengths.append(start - pos)
                owners.append(_PAD)
            lengths.append(length)
            owners.append(owner)
            pos = start + length
        if pos < numel:
            lengths.append(numel - pos)
            owners.append(_PAD)
        return cls(lengths, owners, num_params, group)


class Lamb(Optimizer):
    """LAMB with DeepSpeed FusedLamb semantics and per-original-tensor trust ratios (see the module docstring)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 bias_correction=True, max_coeff: Optional[float] = 10.0, min_coeff: Optional[float] = 0.01,
                 eps_inside_sqrt: bool = False):
        if bias_correction not in (True, False, "moments"):
            raise ValueError(f"bias_correction must be True, False or 'moments', not {bias_correction!r}")
        if not 0.0 <= lr:
            raise ValueError(f"invalid lr {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        max_coeff=max_coeff, min_coeff=min_coeff, eps_inside_sqrt=eps_inside_sqrt)
        super().__init__(params, defaults)
        # id(flat partition) -> (the tensor, its layout); the tensor is held so that its id is never reused
        self._layouts: dict[int, tuple[torch.Tensor, FlatLayout]] = {}

    # -- layouts ---------------------------------------------------------------------------------------------
    def set_layout(self, flat: torch.Tensor, layout: FlatLayout) -> None:
        """Declare that ``flat`` (a parameter this optimizer steps) is a partition laid out as ``layout``."""
        if flat.dim() != 1 or flat.numel() != layout.numel:
            raise ValueError(f"layout covers {layout.numel} elements, the partition has shape {tuple(flat.shape)}")
        if flat.dtype != torch.float32:
            raise ValueError(f"flat partitions must be fp32 master weights, got {flat.dtype}")
        self._layouts[id(flat)] = (flat, layout)

    def clear_layouts(self) -> None:
        self._layouts.clear()

    def layout_of(self, p: torch.Tensor) -> Optional[FlatLayout]:
        entry = self._layouts.get(id(p))
        if entry is None or entry[0] is not p:
            return None
        return entry[1]

    # -- the step --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                layout = self.layout_of(p)
                if layout is None:
                    self._step_tensor(p, group)
                else:
                    self._step_flat(p, layout, group)
        return loss

    def _moments_and_update(self, p, w, g, group):
        """Advance the moments of ``p``; return (update u, step size) for fp32 weights ``w`` and gradient ``g``."""
        state = self.state[p]
        if not state:
            state["step"] = 0  # a Python int, as in FusedLamb (DeepSpeed slices tensor-valued state on save)
            state["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
        state["step"] += 1
        t = state["step"]
        b1, b2 = group["betas"]
        eps, lr, wd = group["eps"], group["lr"], group["weight_decay"]
        mode = group.get("bias_correction", True)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        if mode == "moments":  # u = (m / bc1) / (sqrt(v / bc2) + eps)
            den = v / bc2
            step_size = lr
        else:  # FusedLamb: u = m / (sqrt(v) + eps), bias correction in the step size
            den = v.clone()
            step_size = lr * math.sqrt(bc2) / bc1 if mode else lr
        if group.get("eps_inside_sqrt", False):
            den.add_(eps).sqrt_()
        else:
            den.sqrt_().add_(eps)
        u = torch.div(m / bc1 if mode == "moments" else m, den, out=den)
        if wd != 0:
            u.add_(w, alpha=wd)
        return u, step_size

    @staticmethod
    def _ratio(w_norm: torch.Tensor, u_norm: torch.Tensor, group) -> torch.Tensor:
        ok = (w_norm > 0) & (u_norm > 0)
        ratio = w_norm / torch.where(ok, u_norm, torch.ones_like(u_norm))
        lo, hi = group.get("min_coeff"), group.get("max_coeff")
        if lo is not None or hi is not None:
            ratio = ratio.clamp(min=lo, max=hi)
        return torch.where(ok, ratio, torch.ones_like(ratio))

    def _step_tensor(self, p, group):
        """One original tensor, unpartitioned."""
        w = p.data if p.dtype == torch.float32 else p.data.float()
        g = p.grad if p.grad.dtype == torch.float32 else p.grad.float()
        u, step_size = self._moments_and_update(p, w, g, group)
        w_norm = torch.linalg.vector_norm(w).double()
        u_norm = torch.linalg.vector_norm(u).double()
        coef = (self._ratio(w_norm, u_norm, group) * -step_size).float()
        w.add_(u.mul_(coef))
        if w is not p.data:
            p.data.copy_(w)

    def _step_flat(self, p, layout: FlatLayout, group):
        """One flat ZeRO partition: per-parameter norms over the parameter's slices, summed over all ranks."""
        if p.numel() != layout.numel or p.dtype != torch.float32:
            raise RuntimeError(f"a flat partition changed since attach_to_engine ({p.numel()} elements, {p.dtype}; "
                               f"layout {layout.numel}): call attach_to_engine again")
        w, g = p.data.view(-1), p.grad.view(-1)
        if g.dtype != torch.float32:
            g = g.float()
        if layout.pads:  # padding may be uninitialised memory (ZeRO-3): keep it at zero, out of every norm
            w_pieces, g_pieces = w.split(layout.lengths), g.split(layout.lengths)
            torch._foreach_zero_([w_pieces[k] for k in layout.pads] + [g_pieces[k] for k in layout.pads])
        u, step_size = self._moments_and_update(p, w, g, group)
        u = u.view(-1)
        w_pieces, u_pieces = w.split(layout.lengths), u.split(layout.lengths)
        if layout.pads:
            torch._foreach_zero_([u_pieces[k] for k in layout.pads])
        w_real = [w_pieces[k] for k in layout.real]
        u_real = [u_pieces[k] for k in layout.real]
        sums = torch.zeros(2, layout.num_params, dtype=torch.float64, device=w.device)
        owners = layout.owner_index(w.device)
        if w_real:
            sq = torch.stack([torch.stack(torch._foreach_norm(w_real)), torch.stack(torch._foreach_norm(u_real))])
            sums.index_add_(1, owners, sq.double().square())
        sums = _all_reduce_sum(sums, layout.group)  # every rank takes part, even with no piece of its own
        ratio = self._ratio(sums[0].sqrt(), sums[1].sqrt(), group)
        if w_real:
            coef = (ratio * -step_size).float()[owners]
            torch._foreach_mul_(u_real, list(coef.unbind(0)))
            torch._foreach_add_(w_real, u_real)


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed as dist

    if group is False or not dist.is_available() or not dist.is_initialized():
        return t
    if dist.get_world_size(group=group) == 1:
        return t
    dev = t.device
    if dev.type == "cpu" and dist.get_backend(group) not in ("gloo", "mpi"):  # e.g. nccl with offloaded partitions
        from deepspeed.accelerator import get_accelerator

        t = t.to(get_accelerator().current_device_name())
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.to(dev)


# -- reading DeepSpeed's partitioning ---------------------------------------------------------------------------
class UnsupportedDeepSpeed(RuntimeError):
    pass


def _check_version() -> None:
    import deepspeed

    if not deepspeed.__version__.startswith(SUPPORTED_DEEPSPEED):
        raise UnsupportedDeepSpeed(
            f"evaclip's ZeRO-aware LAMB reads DeepSpeed internals verified on deepspeed "
            f"{'/'.join(v + 'x' for v in SUPPORTED_DEEPSPEED)}; this is deepspeed {deepspeed.__version__}. Pin "
            f"deepspeed, or re-verify evaclip_cli/engine/lamb.py (tests/test_lamb.py) and extend SUPPORTED_DEEPSPEED")


def _need(obj, names: Sequence[str], what: str) -> None:
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise UnsupportedDeepSpeed(f"{what} has no {', '.join(missing)}: DeepSpeed's internals changed; "
                                   f"evaclip's LAMB cannot map its flat partitions onto parameters")


def _fail(msg: str):
    raise UnsupportedDeepSpeed(f"evaclip LAMB: {msg} (DeepSpeed internals not as expected)")


def _ranges_in(offsets: Sequence[int], numels: Sequence[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Pieces of [lo, hi) of a flat buffer holding tensor j at [offsets[j], offsets[j] + numels[j])."""
    out = []
    for j, (off, n) in enumerate(zip(offsets, numels)):
        a, b = max(off, lo), min(off + n, hi)
        if a < b:
            out.append((a - lo, b - a, j))
    return out


def _check_views(params, offsets, flat_bit16, where: str) -> None:
    """The model's low-precision params are views into DeepSpeed's flat buffer: their offsets must match ours."""
    base, size = flat_bit16.data_ptr(), flat_bit16.element_size()
    storage = flat_bit16.untyped_storage().data_ptr()
    for j, (q, off) in enumerate(zip(params, offsets)):
        if q.numel() == 0 or q.data.untyped_storage().data_ptr() != storage:
            continue  # storage swapped out (offload of states): nothing to compare
        if (q.data.data_ptr() - base) != off * size:
            _fail(f"{where}: parameter {j} sits at element {(q.data.data_ptr() - base) // size} of the flat buffer, "
                  f"expected {off}")


def _layouts_stage12(zero, rank_of) -> list[tuple[torch.Tensor, FlatLayout]]:
    """DeepSpeedZeroOptimizer: group i is flattened in ``round_robin_bit16_groups[i]`` order, parameter j at
    ``round_robin_bit16_offsets[i][j]`` (``parameter_alignment`` adds padding between parameters, the alignment to
    2 x world size adds it at the end), and split into equal ``partition_size[i]`` pieces; rank r's fp32 piece is
    ``single_partition_of_fp32_groups[i]``."""
    _need(zero, ("round_robin_bit16_groups", "round_robin_bit16_offsets", "round_robin_bit16_meta",
                 "bit16_groups_flat", "partition_size", "single_partition_of_fp32_groups", "real_dp_process_group",
                 "params_in_partition", "first_offset"), type(zero).__name__)
    if getattr(zero, "zenflow", False):
        _fail("ZenFlow steps its own CPU optimizer")
    out = []
    for i, params in enumerate(zero.round_robin_bit16_groups):
        pg = zero.real_dp_process_group[i]
        rank, world = rank_of(pg)
        flat = zero.single_partition_of_fp32_groups[i]
        ps = int(zero.partition_size[i])
        offsets = [int(o) for o in zero.round_robin_bit16_offsets[i]]
        numels = [int(m.numel()) for m in zero.round_robin_bit16_meta[i]]
        if flat.numel() != ps or zero.bit16_groups_flat[i].numel() != ps * world:
            _fail(f"group {i}: partition of {flat.numel()} elements, partition_size {ps}, flat buffer "
                  f"{zero.bit16_groups_flat[i].numel()} for {world} ranks")
        if len(offsets) != len(params) or len(numels) != len(params):
            _fail(f"group {i}: {len(params)} parameters, {len(offsets)} offsets")
        if any(a + n > b for a, n, b in zip(offsets, numels, offsets[1:])) or offsets[-1] + numels[-1] > ps * world:
            _fail(f"group {i}: parameter offsets overlap or leave the flat buffer")
        lo, hi = rank * ps, rank * ps + ps
        ranges = _ranges_in(offsets, numels, lo, hi)
        # cross-check with DeepSpeed's own view of this partition
        mine = sorted(id(params[j]) for _, _, j in ranges)
        theirs = sorted(id(q) for q in zero.params_in_partition[i] if q.numel() > 0)
        if mine != theirs:
            _fail(f"group {i}: parameters in partition {rank} differ from DeepSpeed's params_in_partition")
        first = next((offsets[j] for _, _, j in ranges), lo)
        if int(zero.first_offset[i]) != max(0, lo - first):
            _fail(f"group {i}: first_offset {zero.first_offset[i]} != {max(0, lo - first)}")
        _check_views(params, offsets, zero.bit16_groups_flat[i], f"group {i}")
        out.append((flat, FlatLayout.from_ranges(ps, ranges, len(params), pg)))
    return out


def _layouts_bf16(zero, rank_of) -> list[tuple[torch.Tensor, FlatLayout]]:
    """BF16_Optimizer: ``bf16_groups[i]`` back to back in ``bf16_groups_flat[i]`` (padding at the end), split
    into equal pieces; rank r's fp32 piece is ``fp32_groups_flat_partition[i]``."""
    _need(zero, ("bf16_groups", "bf16_groups_flat", "fp32_groups_flat_partition", "real_dp_process_group"),
          type(zero).__name__)
    out = []
    for i, params in enumerate(zero.bf16_groups):
        pg = zero.real_dp_process_group[i]
        rank, world = rank_of(pg)
        flat = zero.fp32_groups_flat_partition[i]
        total = zero.bf16_groups_flat[i].numel()
        ps = total // world
        if flat.numel() != ps or ps * world != total:
            _fail(f"bf16 group {i}: partition of {flat.numel()} elements, flat buffer {total}, {world} ranks")
        numels = [q.numel() for q in params]
        offsets = [0]
        for n in numels[:-1]:
            offsets.append(offsets[-1] + n)
        if offsets[-1] + numels[-1] > total:
            _fail(f"bf16 group {i}: parameters exceed the flat buffer")
        _check_views(params, offsets, zero.bf16_groups_flat[i], f"bf16 group {i}")
        ranges = _ranges_in(offsets, numels, rank * ps, rank * ps + ps)
        out.append((flat, FlatLayout.from_ranges(ps, ranges, len(params), pg)))
    return out


def _layouts_stage3(zero, rank_of) -> list[tuple[torch.Tensor, FlatLayout]]:
    """DeepSpeedZeroOptimizer_Stage3: sub-group i is ``fp16_groups[i]``; its fp32 partition
    ``fp32_partitioned_groups_flat[i]`` is the parameters' ``ds_tensor`` partitions back to back, each
    ``partition_numel()`` = ceil(numel / world) long, rank r holding elements [r * part, (r + 1) * part) of the
    parameter and padding past its end; sums are reduced over ``sub_group_process_groups[i]``."""
    _need(zero, ("fp16_groups", "fp32_partitioned_groups_flat", "fp16_partitioned_groups_flat_numel",
                 "sub_group_process_groups"), type(zero).__name__)
    if getattr(zero, "zenflow", False):
        _fail("ZenFlow steps its own CPU optimizer")
    if getattr(zero, "swap_optimizer", False):
        raise UnsupportedDeepSpeed("evaclip LAMB: NVMe optimizer swapping is not supported (flat partitions are "
                                   "swapped in and out; not verified)")
    if getattr(zero, "offload_optimizer", False) and float(getattr(zero, "partial_offload", 1.0)) != 1.0:
        raise UnsupportedDeepSpeed("evaclip LAMB: partial optimizer offload (ratio < 1) steps the GPU sub-groups with "
                                   "DeepSpeed's own AdamW, not with this optimizer")
    out = []
    for i, params in enumerate(zero.fp16_groups):
        pg = zero.sub_group_process_groups[i]
        rank, world = rank_of(pg)
        flat = zero.fp32_partitioned_groups_flat[i]
        ranges, off = [], 0
        for j, q in enumerate(params):
            part = int(q.partition_numel())
            if int(q.ds_tensor.ds_numel) != part or part * world < int(q.ds_numel):
                _fail(f"sub-group {i}: parameter {j} has a partition of {part} elements for {q.ds_numel} on "
                      f"{world} ranks")
            valid = max(0, min(part, int(q.ds_numel) - rank * part))
            if valid:
                ranges.append((off, valid, j))
            off += part
        if off != flat.numel() or off != int(zero.fp16_partitioned_groups_flat_numel[i]):
            _fail(f"sub-group {i}: partitions add up to {off} elements, the flat fp32 partition has {flat.numel()}")
        out.append((flat, FlatLayout.from_ranges(off, ranges, len(params), pg)))
    return out


def _undo_unfused_init_step(zero, lamb: Lamb, engine) -> bool:
    """FP16_UnfusedOptimizer (bf16/fp16 without ZeRO) runs one optimizer step with zero gradients while it is built,
    which for LAMB is a decay step (u = wd p). Right after initialize, restore the fp32 masters from the model's
    weights (they were cloned from them) and forget that step."""
    _need(zero, ("fp16_groups", "fp32_groups"), type(zero).__name__)
    if getattr(engine, "global_steps", 0) != 0:
        return False
    masters = [q for group in zero.fp32_groups for q in group]
    if not all(lamb.state.get(q, {}).get("step") == 1 for q in masters):
        return False
    for low, high in zip(zero.fp16_groups, zero.fp32_groups):
        for lp, hp in zip(low, high):
            hp.data.copy_(lp.data)
            lamb.state.pop(hp, None)
    return True


def attach_to_engine(engine, optimizer: Optional[Lamb] = None) -> Lamb:
    """Give the LAMB inside ``engine`` the layout of every flat partition DeepSpeed hands it.

    Call right after ``deepspeed.initialize`` (before ``load_checkpoint``; loading keeps the partitions, so the
    layouts stay valid). ``optimizer`` defaults to the client optimizer found in ``engine.optimizer``. Raises
    ``UnsupportedDeepSpeed`` when DeepSpeed is not laid out as verified, rather than train with shard-wide ratios.
    """
    import torch.distributed as dist

    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    lamb = optimizer if optimizer is not None else inner
    if not isinstance(lamb, Lamb):
        raise TypeError(f"attach_to_engine expects evaclip's Lamb, the engine steps {type(lamb).__name__}")
    if lamb is not inner and lamb is not wrapper:
        raise UnsupportedDeepSpeed(f"the Lamb given is not the optimizer DeepSpeed steps ({type(inner).__name__})")
    lamb.clear_layouts()
    if wrapper is lamb:  # no ZeRO, fp32: DeepSpeed steps the model's own tensors
        return lamb

    _check_version()
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    def rank_of(pg):
        return dist.get_rank(group=pg), dist.get_world_size(group=pg)

    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        layouts = _layouts_stage3(wrapper, rank_of)
    elif isinstance(wrapper, DeepSpeedZeroOptimizer):
        layouts = _layouts_stage12(wrapper, rank_of)
    elif isinstance(wrapper, BF16_Optimizer):
        layouts = _layouts_bf16(wrapper, rank_of)
    elif isinstance(wrapper, FP16_UnfusedOptimizer):
        _undo_unfused_init_step(wrapper, lamb, engine)
        return lamb  # per-tensor fp32 master copies: nothing to map
    elif isinstance(wrapper, FP16_Optimizer):
        raise UnsupportedDeepSpeed("evaclip LAMB: DeepSpeed's fused FP16_Optimizer (one flat fp32 copy of all "
                                   "weights) is not supported")
    else:
        raise UnsupportedDeepSpeed(f"evaclip LAMB: unknown DeepSpeed optimizer wrapper {type(wrapper).__name__}")

    stepped = {id(q) for group in lamb.param_groups for q in group["params"]}
    for flat, layout in layouts:
        # stage 3 fills its param groups only for the duration of each sub-group's step
        if not isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3) and id(flat) not in stepped:
            _fail("a flat partition is not among the optimizer's parameters")
        lamb.set_layout(flat, layout)
    return lamb
