"""``evaclip estimate``: parameters, memory per GPU under ZeRO 0-3, FLOPs and GPU-hours of a recipe.

Everything is arithmetic on the recipe; the only model built is an empty one on the meta device, for exact
parameter counts. :func:`estimate_result` runs the steps (tokens, model setup, activations, states per ZeRO
stage, largest micro batch, FLOPs, time, warnings) and returns a typed :class:`Estimate`; :func:`estimate` is its
plain dict (the ``--json`` output); :func:`run_estimate` prints it.

Notation: ``P`` parameters, ``N`` GPUs, ``b`` micro batch per GPU, and per tower ``L`` layers, ``h`` width,
``f`` MLP width, ``a`` heads, ``s`` training sequence length *after* CLIPA token reduction
(``recipe.image_tokens()`` / ``recipe.text_tokens()``), ``e`` bytes per activation element (2 in bf16/fp16,
4 in fp32).

Parameters
    Counted exactly on the meta device (``build_clip`` + ``tower_params``). Distillation (MIM) trains the student
    *vision trunk* only (no CLIP head, no text tower) plus ``mask_token`` (h) and ``lm_head`` (h -> teacher
    embed dim, with bias); the teacher's vision tower (trunk + CLIP head) is frozen: weights only.

Model states (bytes per trainable parameter; ZeRO paper, Rajbhandari et al. 2020, as DeepSpeed 0.19 lays them out)
    bf16/fp16: weights 2 + grads 2 + optimizer 12 (fp32 master, Adam/LAMB m and v) = 16.
    fp32:      weights 4 + grads 4 + optimizer 8 (m, v) = 16 without ZeRO. ZeRO 1-3 keep their own fp32 copy of
               the rank's partition even when the weights are fp32 (stage_1_and_2.py clones it; stage3.py would
               share it, but its check compares a torch.device with a string and never holds): optimizer 12,
               measured by bench/scale_rehearsal.py.
    ZeRO-1 divides the optimizer states by N, ZeRO-2 also the grads, ZeRO-3 also the weights. Buffers: ZeRO >= 1
    keeps a gradient bucket of ``reduce_bucket_size`` elements (contiguous_gradients; evaclip's GPU config: 5e8,
    1 GB in bf16); ZeRO-3 also gathers a whole block to compute it: the 16-bit weights and grads of the largest
    transformer block (DeepSpeed's estimator adds 4 bytes x the largest layer for the same reason), and flattens
    the fp32 gradients of the sub-group it steps (``sub_group_size``, 1e9 elements, or the rank's partition if
    smaller: 4 bytes each). The gather and the flattened gradients live only during a block's compute or the
    optimizer step; the bucket for the whole run. bench/scale_rehearsal.py measures all of them.
    ``offload_optimizer`` (ZeRO >= 1) moves the optimizer states, ``offload_param`` (ZeRO-3) the weights, to CPU.
    A frozen teacher is replicated on every GPU at ``distill.teacher_precision``. Parameters frozen by
    ``model.lock`` (fine-tuning, LiT) are module weights only: DeepSpeed leaves parameters outside the optimizer's
    groups out of its flat fp32 partitions, moments and gradient buckets at every stage; ZeRO-3 still partitions
    their 16-bit weights (and gathers a frozen block to compute it). A frozen block stores no activations and
    costs one forward.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models")
    Their per-layer 16-bit count is ``s*b*h*(34 + 5*a*s/h)`` bytes for an MLP of 4h with dropout. Generalised to
    any MLP width, without dropout masks (CLIP trains without dropout), per layer:
        ``e*s*b*(8h + m)``  [+ ``2*e*a*s^2*b`` for attention scores and softmax, eager attention only]
    with ``m = 2f`` (GELU: fc1 output and activation), ``4f`` for SwiGLU (two fc1 outputs, SiLU, product), plus
    ``f + h`` with sub-LN. With f = 4h this is 32*s*b*h (+4*a*s^2*b) in 16-bit. evaclip runs fused SDPA
    (flash / memory-efficient kernels: timm ``fused_attn``, ``nn.MultiheadAttention`` with
    ``need_weights=False``), so the s^2 term is dropped.
    Without checkpointing a tower stores ``L`` full layers; with full (per-block) checkpointing it stores the
    ``L`` block inputs ``e*s*b*h`` each, plus one layer's full activations while it is recomputed (the largest
    layer over the towers), plus the final-norm input ``e*s*b*h`` per tower.
    Contrastive loss (gather-with-grad, local loss): gathered image+text features ``2*b*N*E*e`` and the two
    ``b x b*N`` logit matrices, kept in e bytes plus their fp32 log-softmax: ``2*b*(b*N)*(e + 4)``.
    Distillation: teacher targets and student predictions ``e*b*(patches + masked)*E_teacher``; the teacher
    runs under no_grad, so it stores no activations. Video: each video sample is ``video.frames`` images
    through the vision tower; mixed with image shards by ``video.image_weight``/``video_weight`` (expected
    images per sample).
    A configuration "fits" when model states + activations <= 90% of the card's memory (40 or 80 GiB).

FLOPs per sample (one multiply-add = 2 FLOPs)
    forward per tower = 2 * (matmul weights of the blocks) * s + 4 * L * s^2 * h (QK^T and AV)
                        + 2 * patch-embed weights * patches + 2 * head weights * tokens projected
    (the patch embedding sees every patch before random masking drops some; heads project the pooled token,
    the MIM ``lm_head`` the masked tokens, the teacher's head every patch token). Contrastive logits:
    ``4*E*(b*N)`` per sample. Causal text attention is counted in full, as is conventional.
    Model FLOPs = 3 x forward (forward + backward) for trained towers + 1 x forward for a frozen teacher;
    MFU uses model FLOPs. Gradient checkpointing recomputes the forward: hardware FLOPs = model FLOPs + 1 x
    trained forward (reported as HFU next to MFU).
    GPU-hours = samples * model FLOPs per sample / (peak * MFU) / 3600, peak = dense bf16/fp16 tensor-core
    FLOP/s (A100 312 T, H100 SXM 989 T; TF32 156 T / 495 T for fp32 recipes). Implied MFU of a run of H hours
    on N GPUs = total model FLOPs / (N * H * 3600 * peak).
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from evaclip_cli.engine.config import reduce_bucket_elems
from evaclip_cli.errors import UserError

GiB = 1024**3
USABLE_FRACTION = 0.90
DEFAULT_MFU = 0.40


@dataclass(frozen=True)
class GpuType:
    key: str
    name: str
    memory_gib: int
    peak: dict  # precision -> dense tensor-core FLOP/s


GPU_TYPES: dict[str, GpuType] = {
    "a100-40g": GpuType("a100-40g", "A100-SXM4-40GB", 40, {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    "a100-80g": GpuType("a100-80g", "A100-SXM4-80GB", 80, {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    "h100": GpuType("h100", "H100-SXM5-80GB", 80, {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12}),
}
PEAK_LABEL = {"bf16": "bf16 dense", "fp16": "fp16 dense", "fp32": "tf32 dense"}


# ------------------------------------------------------------------------------------------- model structure
@functools.lru_cache(maxsize=16)
def _model_counts(spec_json: str, lock_json: str = "") -> dict:
    """Exact counts from the CLIP built on the meta device: tower totals, matmul weights, largest block; with a
    ``model.lock`` (JSON), the parameters it freezes and the blocks of each tower that still train."""
    from evaclip_cli.models.clip import build_clip, tower_params
    from evaclip_cli.models.specs import ClipSpec

    spec = ClipSpec.model_validate_json(spec_json)
    model = build_clip(spec, device="meta")
    out = dict(tower_params(model))
    out.update(_locked_counts(model, lock_json, spec))
    c = dict(vision_trunk=0, vision_head=0, vision_block_matmul=0, vision_patch_matmul=0, vision_head_matmul=0,
             text_block_matmul=0, text_proj_matmul=0)
    blocks: dict[tuple, int] = {}
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("visual.trunk."):
            c["vision_trunk"] += n
            m = re.match(r"visual\.trunk\.blocks\.(\d+)\.", name)
            if m:
                blocks[("vision", m.group(1))] = blocks.get(("vision", m.group(1)), 0) + n
                if p.ndim >= 2:
                    c["vision_block_matmul"] += n
            elif name.startswith("visual.trunk.patch_embed.") and p.ndim >= 2:
                c["vision_patch_matmul"] += n
        elif name.startswith("visual."):
            c["vision_head"] += n
            if p.ndim >= 2:
                c["vision_head_matmul"] += n
        elif name.startswith("text."):
            m = re.match(r"text\.transformer\.resblocks\.(\d+)\.", name)
            if m:
                blocks[("text", m.group(1))] = blocks.get(("text", m.group(1)), 0) + n
                if p.ndim >= 2:
                    c["text_block_matmul"] += n
            elif name.startswith("text.text_projection") and p.ndim >= 2:
                c["text_proj_matmul"] += n
    out.update(c)
    out["vision_block_max"] = max((v for (t, _), v in blocks.items() if t == "vision"), default=0)
    out["text_block_max"] = max((v for (t, _), v in blocks.items() if t == "text"), default=0)
    return out


def _locked_counts(model, lock_json: str, spec) -> dict:
    """Frozen parameters under ``model.lock`` (open_clip's lock applied to the meta model) and the blocks of each
    tower with a trained parameter."""
    out = {"frozen": 0, "vision_trained_blocks": spec.vision.depth, "text_trained_blocks": spec.text.layers}
    if not lock_json:
        return out
    from evaclip_cli.models.clip import lock_towers
    from evaclip_cli.recipes import LockSection

    out["frozen"] = lock_towers(model, LockSection.model_validate_json(lock_json))["frozen"]
    for tower, blocks in (("vision", model.visual.trunk.blocks), ("text", model.text.transformer.resblocks)):
        out[f"{tower}_trained_blocks"] = sum(any(p.requires_grad for p in b.parameters()) for b in blocks)
    return out


def _split_locked(t: "_Tower", trained_layers: int) -> list["_Tower"]:
    """A tower whose lower blocks are frozen (``model.lock``) as its frozen part (forward only, no stored
    activations, 16-bit weights) under it and its trained part; the patch embedding is below, the head above."""
    import dataclasses

    if trained_layers >= t.layers:
        return [t]
    per_block = t.block_matmul / t.layers
    low, high = t.extra[:1] if t.name == "vision" else (), t.extra[1:] if t.name == "vision" else t.extra
    frozen = dataclasses.replace(t, name=f"{t.name} (frozen)", layers=t.layers - trained_layers,
                                 block_matmul=int(per_block * (t.layers - trained_layers)), extra=tuple(low),
                                 trained=False)
    if not trained_layers:
        return [dataclasses.replace(frozen, extra=tuple(low) + tuple(high))]
    return [frozen, dataclasses.replace(t, layers=trained_layers, block_matmul=int(per_block * trained_layers),
                                        extra=tuple(high))]


def _contrastive_accumulation(recipe, micro: int, gpus: int) -> int:
    """How many micro batches a contrastive loss sees at once: the accumulation steps in the "global" mode, 1 in
    the "micro" mode (and for distillation)."""
    if recipe.stage == "distill" or recipe.data.contrastive_batch != "global":
        return 1
    return max(1, round(recipe.data.global_batch / (micro * gpus)))


def transformer_forward_flops(layers: int, width: int, seq: int, block_matmul: int, extra=()) -> float:
    """Forward FLOPs of one sequence through a transformer tower: 2 per matmul weight per token through the blocks,
    4·L·s²·w for attention's two matmuls, 2 per weight per token of each ``extra`` matmul ((weights, tokens): patch
    embedding, heads). Training model FLOPs are 3x this (``model_flops_per_sample``); the one formula of
    ``evaclip estimate``, a run's telemetry and ``bench/gpu_check.py``."""
    return 2 * block_matmul * seq + 4 * layers * seq**2 * width + sum(2 * w * t for w, t in extra)


@dataclass
class _Tower:
    """One transformer tower as the estimate sees it."""

    name: str
    layers: int
    width: int
    heads: int
    mlp: int
    swiglu: bool
    subln: bool
    seq: int  # tokens through the blocks, per sequence
    block_matmul: int  # matmul weights of all blocks (every token goes through them)
    extra: tuple  # ((matmul weights, tokens per sequence), ...): patch embedding, heads
    per_sample: float  # sequences per training sample (video frames)
    trained: bool
    block_max: int  # parameters of the largest block

    def forward_flops(self) -> float:
        return transformer_forward_flops(self.layers, self.width, self.seq, self.block_matmul, self.extra) * \
            self.per_sample

    def layer_bytes(self, b_seqs: float, e: int, flash: bool = True) -> float:
        m = (4 if self.swiglu else 2) * self.mlp + ((self.mlp + self.width) if self.subln else 0)
        act = e * self.seq * b_seqs * (8 * self.width + m)
        if not flash:
            act += 2 * e * self.heads * self.seq**2 * b_seqs
        return act

    def activation_bytes(self, b: float, e: int, checkpointing: bool) -> tuple[float, float]:
        """(stored activations, one recomputed layer) for ``b`` samples."""
        bs = b * self.per_sample
        final = e * self.seq * bs * self.width
        if checkpointing:
            return self.layers * e * self.seq * bs * self.width + final, self.layer_bytes(bs, e)
        return self.layers * self.layer_bytes(bs, e) + final, 0.0


def _vision_tower(name, spec, counts, seq, patches, head_tokens, per_sample, trained, head=True) -> _Tower:
    v = spec.vision
    extra = [(counts["vision_patch_matmul"], patches)]
    if head:
        extra.append((counts["vision_head_matmul"], head_tokens))
    return _Tower(name, v.depth, v.width, v.heads, v.mlp_dim, v.swiglu, v.subln, seq, counts["vision_block_matmul"],
                  tuple(extra), per_sample, trained, counts["vision_block_max"])


def _text_tower(spec, counts, seq) -> _Tower:
    t = spec.text
    return _Tower("text", t.layers, t.width, t.heads, int(t.width * t.mlp_ratio), False, False, seq,
                  counts["text_block_matmul"], ((counts["text_proj_matmul"], 1),), 1.0, True, counts["text_block_max"])


# ------------------------------------------------------------------------------------------------- result types
# The typed result of :func:`estimate_result`; ``Estimate.to_dict()`` is the ``--json`` output, field order = key
# order, so these dataclasses are the JSON schema.
@dataclass
class Cluster:
    gpu: str
    gpu_name: str
    gpus: int
    memory_gib: int
    usable_fraction: float
    usable_bytes: int
    peak_flops: float
    peak_kind: str


@dataclass
class Batch:
    global_batch: int
    micro_batch: int
    accumulation: float
    samples: int
    steps: int
    contrastive_batch: str
    negatives: int


@dataclass
class Tokens:
    image: int
    text: int
    image_size: int
    patches: int
    image_method: str
    text_method: str
    images_per_sample: float


@dataclass
class Params:
    vision: int
    text: int
    other: int
    mim_head: int
    teacher_vision: int
    trainable: int
    frozen: int
    total: int


@dataclass
class Activations:
    """Activation bytes at one micro batch: stored by each trained tower, one recomputed layer, the loss."""

    stored: dict[str, int]  # tower name -> bytes
    recompute_layer_bytes: int
    loss_bytes: int
    total_bytes: int

    def to_dict(self) -> dict:
        return {**{f"{k}_bytes": v for k, v in self.stored.items()},
                "recompute_layer_bytes": self.recompute_layer_bytes, "loss_bytes": self.loss_bytes,
                "total_bytes": self.total_bytes}


@dataclass
class StageRow:
    """Model states per GPU at one ZeRO stage, and what fits with / without checkpointing."""

    zero_stage: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    buffers_bytes: int
    gather_bytes: int
    bucket_bytes: int
    step_grads_bytes: int
    model_states_bytes: int
    offloaded: list[str]
    total_ckpt_bytes: int = 0
    fits_ckpt: bool = False
    max_micro_batch_ckpt: int = 0
    total_full_bytes: int = 0
    fits_full: bool = False
    max_micro_batch_full: int = 0


@dataclass
class Memory:
    precision: str
    attention: str
    grad_checkpointing: bool
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    largest_block_params: int
    activations: dict[str, Activations]  # "checkpointed", "full"
    stages: list[StageRow]


@dataclass
class Flops:
    forward_per_sample: dict[str, float]
    forward_total_per_sample: float
    model_per_sample: float
    hardware_per_sample: float
    total_model: float
    total_hardware: float


@dataclass
class Compute:
    mfu: float
    gpu_hours: Optional[float] = None
    wall_clock_hours: Optional[float] = None
    wall_clock_days: Optional[float] = None


@dataclass
class Implied:
    hours: float
    source: str
    gpus: int
    mfu: float
    hfu: float


@dataclass
class Estimate:
    """Everything ``evaclip estimate`` reports about one recipe on one cluster."""

    recipe: str
    stage: str
    arch: str
    cluster: Cluster
    batch: Batch
    tokens: Tokens
    params: Params
    memory: Memory
    flops: Flops
    compute: Compute
    implied: Optional[Implied]
    warnings: list[str]

    def to_dict(self) -> dict:
        """The plain, JSON-serialisable dict (stable keys) that ``--json`` prints."""
        import dataclasses

        d = dataclasses.asdict(self)
        d["memory"]["activations"] = {k: a.to_dict() for k, a in self.memory.activations.items()}
        return d


# ------------------------------------------------------------------------------------------------- estimate
def _bytes_per(precision: str) -> tuple[int, int, int, int]:
    """(weights, grads, optimizer states, activations) bytes per element."""
    if precision == "fp32":
        return 4, 4, 8, 4
    return 2, 2, 12, 2


def _images_per_sample(recipe) -> float:
    if recipe.stage != "video" or not any(s.kind == "video" for s in recipe.data.train):
        return 1.0
    iw, vw = recipe.video.image_weight, recipe.video.video_weight
    frac = vw / (iw + vw) if iw + vw > 0 else 1.0
    if not any(s.kind == "image" for s in recipe.data.train):
        frac = 1.0
    return 1.0 + frac * (recipe.video.frames - 1)


def _check_inputs(recipe, gpu: Optional[str], gpus: Optional[int], hours: Optional[float], mfu: float
                  ) -> tuple[GpuType, int]:
    """The card and the number of GPUs (the recipe's ``compute`` section unless given); bad values are a UserError."""
    gpu_key = gpu or recipe.compute.gpu
    if gpu_key not in GPU_TYPES:
        raise UserError(f"unknown GPU '{gpu_key}'; known: {', '.join(GPU_TYPES)}")
    n_gpus = recipe.compute.gpus if gpus is None else int(gpus)
    if n_gpus < 1:
        raise UserError(f"--gpus must be at least 1 (got {n_gpus})")
    if not 0.0 < mfu <= 1.0:
        raise UserError(f"--mfu must be in (0, 1] (got {mfu})")
    if hours is not None and hours <= 0:
        raise UserError(f"--hours must be positive (got {hours})")
    return GPU_TYPES[gpu_key], n_gpus


def _tokens(recipe, spec) -> Tokens:
    """Tokens per sample after CLIPA's reduction, the training image size and its patch grid."""
    img_size = recipe.train_image_size()
    patches = (img_size // spec.vision.patch_size) ** 2
    s_img, s_txt = recipe.image_tokens(), recipe.text_tokens()
    return Tokens(image=s_img, text=s_txt if recipe.stage != "distill" else 0, image_size=img_size, patches=patches,
                  image_method=recipe.tokens.image.method, text_method=recipe.tokens.text.method,
                  images_per_sample=_images_per_sample(recipe))


@dataclass(frozen=True)
class _Loss:
    """The loss's forward FLOPs per sample and activation bytes: distillation's teacher targets and student
    predictions (``tokens`` per sample of width ``embed``), or the contrastive features and logits (``embed``, over
    ``accum`` micro batches of ``gpus`` GPUs under the global contrastive batch)."""

    flops: float
    e: int  # bytes per activation element
    embed: int
    distill_tokens: int = 0
    accum: int = 1
    gpus: int = 1

    def bytes(self, bb: float) -> float:
        if self.distill_tokens:
            return self.e * bb * self.distill_tokens * self.embed
        # each micro batch's rows meet the features of all accumulated micro batches of every GPU, held in a fp32
        # cache (data.contrastive_batch = "global")
        rows = self.accum * bb
        cache = 2 * rows * self.embed * 4 if self.accum > 1 else 0
        return 2 * rows * self.gpus * self.embed * self.e + 2 * rows * (rows * self.gpus) * (self.e + 4) + cache


@dataclass
class _Setup:
    """What the model contributes: parameter counts, its towers (trained and frozen parts), the weights of a frozen
    teacher (replicated on every GPU) and the loss."""

    distill: bool
    params: Params
    towers: list[_Tower]
    frozen_bytes: int
    loss: _Loss
    warnings: list[str]

    @property
    def trained(self) -> list[_Tower]:
        return [t for t in self.towers if t.trained]


def _distill_setup(recipe, spec, tok: Tokens, e: int) -> _Setup:
    """MIM distillation: the student's vision trunk + mask_token + lm_head trains, the teacher's vision tower runs
    frozen on every patch."""
    from evaclip_cli.models.specs import resolve_arch

    counts = _model_counts(spec.model_dump_json())
    tspec = resolve_arch(recipe.distill.teacher_arch)
    tcounts = _model_counts(tspec.model_dump_json())
    img_size, patches = tok.image_size, tok.patches
    if img_size % tspec.vision.patch_size:
        raise UserError(f"teacher '{recipe.distill.teacher_arch}' patch size {tspec.vision.patch_size} does not "
                        f"divide the training image size {img_size}")
    t_patches = (img_size // tspec.vision.patch_size) ** 2
    warnings = []
    if t_patches != patches:
        warnings.append(f"teacher grid ({t_patches} patches) differs from the student's ({patches}): "
                        "targets will not align")
    masked = int(round(recipe.distill.mask_ratio * patches))
    w, te = spec.vision.width, tspec.embed_dim
    mim_head = w + w * te + te  # mask_token + lm_head (weight, bias)
    student, teacher = counts["vision_trunk"] + mim_head, tcounts["vision"]
    params = Params(vision=student, text=0, other=0, mim_head=mim_head, teacher_vision=teacher, trainable=student,
                    frozen=teacher, total=student + teacher)
    v = spec.vision
    towers = [
        _Tower("vision", v.depth, w, v.heads, v.mlp_dim, v.swiglu, v.subln, tok.image, counts["vision_block_matmul"],
               ((counts["vision_patch_matmul"], patches), (w * te, masked)), 1.0, True, counts["vision_block_max"]),
        _vision_tower("teacher", tspec, tcounts, t_patches + 1, t_patches, t_patches, 1.0, False),
    ]
    t_wb = 4 if recipe.distill.teacher_precision == "fp32" else 2
    return _Setup(True, params, towers, teacher * t_wb, _Loss(0.0, e, te, distill_tokens=patches + masked), warnings)


def _clip_setup(recipe, spec, tok: Tokens, n_gpus: int, e: int) -> _Setup:
    """CLIP: both towers train, less what ``model.lock`` freezes (fine-tuning, LiT: weights only, forward only)."""
    lock = recipe.model.lock
    counts = _model_counts(spec.model_dump_json(), lock.model_dump_json() if lock.image or lock.text else "")
    locked = counts["frozen"]
    params = Params(vision=counts["vision"], text=counts["text"], other=counts["other"], mim_head=0, teacher_vision=0,
                    trainable=counts["total"] - locked, frozen=locked, total=counts["total"])
    towers = [
        *_split_locked(_vision_tower("vision", spec, counts, tok.image, tok.patches, 1, tok.images_per_sample, True),
                       counts["vision_trained_blocks"]),
        *_split_locked(_text_tower(spec, counts, tok.text), counts["text_trained_blocks"]),
    ]
    b, E = recipe.data.micro_batch, spec.embed_dim
    A = _contrastive_accumulation(recipe, b, n_gpus)
    return _Setup(False, params, towers, 0, _Loss(4.0 * E * A * b * n_gpus, e, E, accum=A, gpus=n_gpus), [])


def _activations(setup: _Setup, bb: float, e: int, checkpointing: bool) -> Activations:
    """Activation bytes per GPU at micro batch ``bb``: the trained towers' stored tensors, the largest layer being
    recomputed (checkpointing) and the loss."""
    stored = {t.name: 0.0 for t in setup.trained}
    peak_layer = 0.0
    for t in setup.trained:
        s_, layer = t.activation_bytes(bb, e, checkpointing)
        stored[t.name] = s_
        peak_layer = max(peak_layer, layer)
    loss = setup.loss.bytes(bb)
    total = sum(stored.values()) + peak_layer + loss
    return Activations({k: int(v) for k, v in stored.items()}, int(peak_layer), int(loss), int(total))


@dataclass(frozen=True)
class _States:
    """What the model-state bytes per GPU depend on (see the module docstring, "Model states")."""

    precision: str
    trainable: int
    locked: int  # frozen by model.lock: 16-bit weights (ZeRO-3 partitions them too), no grads, no optimizer states
    gpus: int
    largest_block: int
    frozen_block: int
    frozen_bytes: int  # a frozen teacher, replicated
    bucket_elems: int
    sub_group_elems: int
    offload_optimizer: bool
    offload_param: bool

    def at(self, stage: int) -> StageRow:
        wb, gb, ob, _ = _bytes_per(self.precision)
        P, n = self.trainable, self.gpus
        weights = wb * (P + self.locked) / (n if stage >= 3 else 1)
        grads = gb * P / (n if stage >= 2 else 1)
        own_master = self.precision == "fp32" and stage >= 1  # DeepSpeed's optimizer clones the fp32 partition
        optim = (ob + (4 if own_master else 0)) * P / (n if stage >= 1 else 1)
        offloaded = []
        if self.offload_optimizer and stage >= 1:
            optim = 0.0
            offloaded.append("optimizer")
        if self.offload_param and stage == 3:
            weights = 0.0
            offloaded.append("weights")
        gather = max((wb + gb) * self.largest_block, wb * self.frozen_block) if stage == 3 else 0
        bucket = gb * min(self.bucket_elems, P) if stage >= 1 else 0
        step_grads = 4 * min(self.sub_group_elems, P / n) if stage == 3 else 0
        buffers = gather + bucket + step_grads
        weights += self.frozen_bytes
        return StageRow(zero_stage=stage, weights_bytes=int(weights), grads_bytes=int(grads),
                        optimizer_bytes=int(optim), buffers_bytes=int(buffers), gather_bytes=int(gather),
                        bucket_bytes=int(bucket), step_grads_bytes=int(step_grads),
                        model_states_bytes=int(weights + grads + optim + buffers), offloaded=offloaded)


def _states(recipe, setup: _Setup, n_gpus: int) -> _States:
    trained, frozen = setup.trained, [t for t in setup.towers if not t.trained]
    zero = (recipe.deepspeed.extra or {}).get("zero_optimization", {})
    return _States(
        precision=recipe.deepspeed.precision, trainable=setup.params.trainable,
        locked=setup.params.frozen if not setup.distill else 0, gpus=n_gpus,
        largest_block=max((t.block_max for t in trained), default=0),
        frozen_block=max((t.block_max for t in frozen), default=0) if not setup.distill else 0,
        frozen_bytes=setup.frozen_bytes, bucket_elems=reduce_bucket_elems(recipe, on_gpu=True),
        sub_group_elems=int(float(zero.get("sub_group_size", 1e9))),
        offload_optimizer=recipe.deepspeed.offload_optimizer, offload_param=recipe.deepspeed.offload_param)


def _max_micro(fits: Callable[[int], bool]) -> int:
    """The largest micro batch for which ``fits`` holds (0 if none): doubling, then bisection."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi) and hi < 1 << 24:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _stage_row(states: _States, stage: int, setup: _Setup, act: dict[str, Activations], e: int,
               usable: float) -> StageRow:
    """One ZeRO stage: its model states, the totals at the recipe's micro batch and the largest micro batch that
    fits, with and without checkpointing."""
    import dataclasses

    row = states.at(stage)
    ms = row.model_states_bytes

    def largest(ckpt: bool) -> int:
        return _max_micro(lambda bb: ms + _activations(setup, bb, e, ckpt).total_bytes <= usable)

    ck, fu = ms + act["checkpointed"].total_bytes, ms + act["full"].total_bytes
    return dataclasses.replace(row, total_ckpt_bytes=int(ck), fits_ckpt=bool(ck <= usable),
                               max_micro_batch_ckpt=largest(True), total_full_bytes=int(fu),
                               fits_full=bool(fu <= usable), max_micro_batch_full=largest(False))


def _memory(recipe, setup: _Setup, n_gpus: int, usable: float) -> Memory:
    """Activations at the recipe's micro batch and model states per ZeRO stage 0-3."""
    e = _bytes_per(recipe.deepspeed.precision)[3]
    b = recipe.data.micro_batch
    act = {"checkpointed": _activations(setup, b, e, True), "full": _activations(setup, b, e, False)}
    states = _states(recipe, setup, n_gpus)
    return Memory(precision=recipe.deepspeed.precision, attention="sdpa",
                  grad_checkpointing=recipe.model.grad_checkpointing, zero_stage=recipe.deepspeed.zero_stage,
                  offload_optimizer=states.offload_optimizer, offload_param=states.offload_param,
                  largest_block_params=states.largest_block, activations=act,
                  stages=[_stage_row(states, k, setup, act, e, usable) for k in range(4)])


def _batch(recipe, setup: _Setup, n_gpus: int) -> Batch:
    b = recipe.data.micro_batch
    return Batch(global_batch=recipe.data.global_batch, micro_batch=b,
                 accumulation=recipe.data.global_batch / (b * n_gpus), samples=recipe.data.samples, steps=recipe.steps,
                 contrastive_batch=recipe.data.contrastive_batch,
                 negatives=0 if setup.distill else b * n_gpus * _contrastive_accumulation(recipe, b, n_gpus))


def _batch_warnings(recipe, batch: Batch, memory: Memory, card: GpuType, n_gpus: int, usable: float) -> list[str]:
    """An accumulation that is not a whole number; the recipe's own ZeRO stage and checkpointing not fitting (with a
    micro batch that would)."""
    warnings = []
    b, accumulation, ckpt = batch.micro_batch, batch.accumulation, memory.grad_checkpointing
    if abs(accumulation - round(accumulation)) > 1e-9 or accumulation < 1:
        warnings.append(f"data.global_batch {batch.global_batch} is not a multiple of micro batch {b} x "
                        f"{n_gpus} GPUs (accumulation would be {accumulation:.3g})")
    own = memory.stages[memory.zero_stage]
    fits, total, m = ((own.fits_ckpt, own.total_ckpt_bytes, own.max_micro_batch_ckpt) if ckpt
                      else (own.fits_full, own.total_full_bytes, own.max_micro_batch_full))
    if fits:
        return warnings
    hint = ""
    for d in range(min(m, b), 0, -1):
        if batch.global_batch % (d * n_gpus) == 0:
            hint = f"; e.g. data.micro_batch={d} with {batch.global_batch // (d * n_gpus)}x gradient accumulation"
            break
    warnings.append(
        f"the recipe's setting (ZeRO-{memory.zero_stage}, {'with' if ckpt else 'without'} "
        f"checkpointing, micro batch {b}) needs {total / GiB:.1f} GiB per GPU, over the "
        f"{usable / GiB:.1f} GiB usable on {card.name}; the largest micro batch that fits is {m}{hint}")
    return warnings


def _flop_counts(setup: _Setup, samples: int, ckpt: bool) -> Flops:
    """Forward FLOPs per sample by tower; model FLOPs (3x a trained forward, 1x a frozen one) and hardware FLOPs
    (+1 trained forward under checkpointing), per sample and for ``samples``."""
    fwd = {t.name: t.forward_flops() for t in setup.towers}
    fwd["loss"] = setup.loss.flops
    trained_fwd = sum(t.forward_flops() for t in setup.trained) + setup.loss.flops
    frozen_fwd = sum(t.forward_flops() for t in setup.towers if not t.trained)
    model_ps = 3 * trained_fwd + frozen_fwd
    if setup.loss.accum > 1:
        model_ps += trained_fwd  # the no-grad forward that fills the feature cache (data.contrastive_batch)
    hw_ps = model_ps + (sum(t.forward_flops() for t in setup.trained) if ckpt else 0)
    return Flops(forward_per_sample={k: float(v) for k, v in fwd.items()},
                 forward_total_per_sample=float(sum(fwd.values())), model_per_sample=float(model_ps),
                 hardware_per_sample=float(hw_ps), total_model=float(model_ps * samples),
                 total_hardware=float(hw_ps * samples))


def _compute(flops: Flops, samples: int, peak: float, mfu: float, n_gpus: int) -> Compute:
    """GPU-hours and wall-clock at ``mfu`` (None without ``data.samples``)."""
    if not samples:
        return Compute(mfu=mfu)
    gh = flops.total_model / (peak * mfu) / 3600
    return Compute(mfu=mfu, gpu_hours=gh, wall_clock_hours=gh / n_gpus, wall_clock_days=gh / n_gpus / 24)


def _implied(recipe, hours: Optional[float], flops: Flops, samples: int, peak: float, n_gpus: int
             ) -> Optional[Implied]:
    """The MFU and HFU a run of ``hours`` (default: the paper-reported hours) on ``n_gpus`` implies."""
    run_hours, source = (hours, "--hours") if hours is not None else (recipe.compute.reported_hours, "paper-reported")
    if not (run_hours and samples):
        return None
    denom = n_gpus * run_hours * 3600 * peak
    return Implied(hours=run_hours, source=source, gpus=n_gpus, mfu=flops.total_model / denom,
                   hfu=flops.total_hardware / denom)


def _time_warnings(samples: int, implied: Optional[Implied]) -> list[str]:
    warnings = []
    if not samples:
        warnings.append("data.samples is 0: set it to get total FLOPs and GPU-hours")
    if implied and implied.hfu > 1.0:
        warnings.append(f"{implied.hours:g} h on {implied.gpus} GPUs would need {implied.hfu:.2f}x the peak: "
                        "impossible at these token counts")
    return warnings


def estimate_result(recipe, gpu: Optional[str] = None, gpus: Optional[int] = None, hours: Optional[float] = None,
                    mfu: float = DEFAULT_MFU) -> Estimate:
    """The numbers behind ``evaclip estimate`` for a loaded :class:`~evaclip_cli.recipes.Recipe`, typed.
    ``gpu``/``gpus`` default to the recipe's ``compute`` section; ``hours`` (default ``compute.reported_hours``)
    gives the MFU a run of that length implies."""
    card, n_gpus = _check_inputs(recipe, gpu, gpus, hours, mfu)
    precision, samples = recipe.deepspeed.precision, recipe.data.samples
    spec = recipe.spec()
    tok = _tokens(recipe, spec)
    e = _bytes_per(precision)[3]
    setup = _distill_setup(recipe, spec, tok, e) if recipe.stage == "distill" else _clip_setup(recipe, spec, tok,
                                                                                                n_gpus, e)
    usable = USABLE_FRACTION * card.memory_gib * GiB
    peak = card.peak[precision]
    memory = _memory(recipe, setup, n_gpus, usable)
    batch = _batch(recipe, setup, n_gpus)
    flops = _flop_counts(setup, samples, recipe.model.grad_checkpointing)
    implied = _implied(recipe, hours, flops, samples, peak, n_gpus)
    warnings = (setup.warnings + _batch_warnings(recipe, batch, memory, card, n_gpus, usable)
                + _time_warnings(samples, implied))
    cluster = Cluster(gpu=card.key, gpu_name=card.name, gpus=n_gpus, memory_gib=card.memory_gib,
                      usable_fraction=USABLE_FRACTION, usable_bytes=int(usable), peak_flops=peak,
                      peak_kind=PEAK_LABEL[precision])
    return Estimate(recipe=recipe.name, stage=recipe.stage, arch=recipe.model.arch, cluster=cluster, batch=batch,
                    tokens=tok, params=setup.params, memory=memory, flops=flops,
                    compute=_compute(flops, samples, peak, mfu, n_gpus), implied=implied, warnings=warnings)


def estimate(recipe, gpu: Optional[str] = None, gpus: Optional[int] = None, hours: Optional[float] = None,
             mfu: float = DEFAULT_MFU) -> dict:
    """:func:`estimate_result` as a plain dict (JSON-serialisable, stable keys: the ``--json`` output)."""
    return estimate_result(recipe, gpu=gpu, gpus=gpus, hours=hours, mfu=mfu).to_dict()


# ------------------------------------------------------------------------------------------------- printing
def _gib(x: float) -> str:
    v = x / GiB
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:,.2f} {unit}" if x / scale < 1e6 else f"{x:.3e} FLOP"
    return f"{x:,.0f} FLOP"


def _params_table(r: Estimate):
    from rich import box
    from rich.table import Table

    t = Table(title=f"Parameters — {r.recipe} ({r.stage}, arch {r.arch})", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("part")
    t.add_column("parameters", justify="right")
    t.add_column("billions", justify="right")
    p, distill = r.params, r.stage == "distill"
    rows = [("vision tower" + (" (student trunk + MIM head)" if distill else ""), p.vision)]
    if distill:
        rows += [("  of which mask_token + lm_head", p.mim_head),
                 ("teacher vision (frozen: weights only)", p.teacher_vision)]
    else:
        rows += [("text tower", p.text), ("other (logit_scale)", p.other)]
    if not distill and p.frozen:
        rows += [("frozen by model.lock (weights only)", p.frozen)]
    rows += [("trainable", p.trainable), ("total", p.total)]
    for name, n in rows:
        t.add_row(name, f"{n:,}", f"{n / 1e9:.3f}")
    return t


def _fit_cell(total: int, ok: bool) -> str:
    return f"[{'green' if ok else 'red'}]{_gib(total)} {'✓' if ok else '✗'}[/]"


def _memory_table(r: Estimate):
    from rich import box
    from rich.table import Table

    cl, mem, b = r.cluster, r.memory, r.batch.micro_batch
    t = Table(title=f"Memory per GPU, GiB ({cl.gpu_name} x {cl.gpus}, {mem.precision}, micro batch {b})",
              caption=f"✓ fits: states + activations <= {cl.usable_fraction:.0%} of {cl.memory_gib} GiB",
              box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("ZeRO", "weights", "grads", "optim", "buffers", "states", "ckpt", "no ckpt", "max b"):
        t.add_column(col, justify="right", no_wrap=True)
    for row in mem.stages:
        k = row.zero_stage
        label = f"{k}{'*' if k == mem.zero_stage else ''}"
        if row.offloaded:
            label += " (offload " + "+".join(row.offloaded) + ")"
        t.add_row(label, _gib(row.weights_bytes), _gib(row.grads_bytes), _gib(row.optimizer_bytes),
                  _gib(row.buffers_bytes), _gib(row.model_states_bytes), _fit_cell(row.total_ckpt_bytes, row.fits_ckpt),
                  _fit_cell(row.total_full_bytes, row.fits_full),
                  f"{row.max_micro_batch_ckpt:,} / {row.max_micro_batch_full:,}")
    return t


def _memory_note(r: Estimate) -> str:
    mem, b = r.memory, r.batch.micro_batch
    ck, fu = mem.activations["checkpointed"], mem.activations["full"]
    return (f"  activations at micro batch {b}: {_gib(ck.total_bytes)} GiB with checkpointing "
            f"(loss {_gib(ck.loss_bytes)}, one recomputed layer {_gib(ck.recompute_layer_bytes)}), "
            f"{_gib(fu.total_bytes)} GiB without; * = the recipe's stage "
            f"(checkpointing {'on' if mem.grad_checkpointing else 'off'}); max b = largest micro batch that fits, "
            "with / without checkpointing; "
            "buffers = ZeRO >= 1 gradient bucket + ZeRO-3 gather of the largest block and fp32 gradients of the "
            "stepped sub-group "
            f"({mem.largest_block_params / 1e6:,.0f}M params)")


def _compute_table(r: Estimate):
    from rich import box
    from rich.table import Table

    fl, comp, tok, cl, imp = r.flops, r.compute, r.tokens, r.cluster, r.implied
    t = Table(title="Compute", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("quantity", no_wrap=True)
    t.add_column("value", justify="right")
    t.add_row("tokens per sample", f"image {tok.image} ({tok.image_size} px, {tok.image_method})"
              + (f", text {tok.text} ({tok.text_method})" if r.stage != "distill" else "")
              + (f", {tok.images_per_sample:.2f} images/sample" if tok.images_per_sample != 1 else ""))
    for name, v in fl.forward_per_sample.items():
        if v or name != "loss":
            t.add_row(f"forward / sample: {name}" + (" (frozen)" if name == "teacher" else ""), _flops(v))
    t.add_row("model FLOPs / sample (training)", _flops(fl.model_per_sample))
    t.add_row("hardware FLOPs / sample (with recompute)", _flops(fl.hardware_per_sample))
    t.add_row("samples / steps", f"{r.batch.samples:,} / {r.batch.steps:,}")
    t.add_row("total model FLOPs", f"{fl.total_model:.3e}")
    t.add_row("peak per GPU", f"{cl.peak_flops / 1e12:,.0f} TFLOP/s ({cl.peak_kind})")
    if comp.gpu_hours is not None:
        t.add_row(f"GPU-hours at {comp.mfu:.0%} MFU", f"{comp.gpu_hours:,.0f}")
        t.add_row(f"wall-clock on {cl.gpus} GPUs", f"{comp.wall_clock_hours:,.0f} h = {comp.wall_clock_days:,.1f} days")
    if imp:
        t.add_row(f"MFU implied by {imp.hours:g} h on {imp.gpus} GPUs ({imp.source})",
                  f"{imp.mfu:.3f} (HFU {imp.hfu:.3f})")
    return t


def _render(r: Estimate) -> None:
    """The three tables (parameters, memory per GPU, compute), the paper check and the warnings."""
    from rich.console import Console

    con = Console()
    con.print(_params_table(r))
    con.print(_memory_table(r))
    con.print(_memory_note(r))
    con.print(_compute_table(r))
    imp = r.implied
    if imp and imp.source == "paper-reported":
        con.print(f"  check against the paper: {imp.hours:g} h on {imp.gpus} x {r.cluster.gpu_name} for "
                  f"{r.batch.samples:,} samples implies MFU {imp.mfu:.1%} (HFU {imp.hfu:.1%} with recompute)")
    for w in r.warnings:
        con.print(f"[yellow]note:[/] {w}")


def run_estimate(recipe: str, overrides: list, gpu: Optional[str] = None, gpus: Optional[int] = None,
                 hours: Optional[float] = None, mfu: float = DEFAULT_MFU, as_json: bool = False) -> dict:
    """Load the recipe, estimate, print tables (or one JSON object with ``as_json``)."""
    from evaclip_cli.recipes import load_recipe

    result = estimate_result(load_recipe(recipe, overrides).recipe, gpu=gpu, gpus=gpus, hours=hours, mfu=mfu)
    r = result.to_dict()
    if as_json:
        import sys

        sys.stdout.write(json.dumps(r, indent=2) + "\n")
    else:
        _render(result)
    return r


def rank_bytes(recipe, world: int, on_gpu: bool, zero_stage: Optional[int] = None) -> tuple[float, float]:
    """(model-state bytes, activation bytes) one rank of a ``world``-process run of ``recipe`` holds at its micro
    batch and ``zero_stage`` (default: the recipe's): parameters, gradients and optimizer states (no buffers: a
    lower bound). Off a GPU an offload moves nothing off the machine, so offloaded states count there."""
    r = estimate_result(recipe, gpus=world)
    stage = recipe.deepspeed.zero_stage if zero_stage is None else zero_stage
    row = r.memory.stages[stage]
    states = float(row.weights_bytes + row.grads_bytes + row.optimizer_bytes)
    if not on_gpu and row.offloaded:
        P, (wb, _, ob, _) = r.params.trainable, _bytes_per(recipe.deepspeed.precision)
        if "optimizer" in row.offloaded:
            states += (ob + (4 if recipe.deepspeed.precision == "fp32" else 0)) * P / world
        if "weights" in row.offloaded:
            states += wb * P / world
    act = r.memory.activations["checkpointed" if recipe.model.grad_checkpointing else "full"].total_bytes
    return float(states), float(act)


def memory_fit(recipe, world: int, available: float, on_gpu: bool, where: str) -> Optional[str]:
    """None when one rank of a ``world``-process run of ``recipe`` fits in ``available`` bytes (``where`` says
    whose: "free memory of cuda:0", "available RAM per rank ..."); else one line: the estimate, what is available
    and what would fit (micro batch, ZeRO stage, offload). Conservative: the estimate leaves buffers, the CUDA
    context and the framework out, so it refuses only a run that clearly cannot fit."""
    states, act = rank_bytes(recipe, world, on_gpu)
    if states + act <= available:
        return None
    b, stage = recipe.data.micro_batch, recipe.deepspeed.zero_stage
    return (f"{recipe.name} does not fit: a rank of this {world}-process run needs about {_gib(states + act)} GiB "
            f"({_gib(states)} GiB of parameters, gradients and optimizer states at ZeRO-{stage}, "
            f"{recipe.deepspeed.precision}; {_gib(act)} GiB of activations at micro batch {b}), over the "
            f"{_gib(available)} GiB {where}; {_what_fits(recipe, world, available, on_gpu, act / b)}; or pass "
            "--skip-memory-check if you know better")


def _what_fits(recipe, world: int, available: float, on_gpu: bool, per_sample: float) -> str:
    """The first change that would fit: a smaller micro batch, a higher ZeRO stage, an offload (GPU)."""
    b, stage, gb = recipe.data.micro_batch, recipe.deepspeed.zero_stage, recipe.data.global_batch
    for k in range(stage, 4):
        states = rank_bytes(recipe, world, on_gpu, k)[0]
        m = min(b, int((available - states) // per_sample)) if available > states else 0
        if m >= 1:
            d = next((d for d in range(m, 0, -1) if gb % (d * world) == 0), m)
            change = ([f"deepspeed.zero_stage={k}"] if k != stage else []) + ([f"data.micro_batch={d}"] if d != b
                                                                               else [])
            return f"{' '.join(change)} would fit ({_gib(states + d * per_sample)} GiB)"
    if on_gpu:
        zero3 = estimate_result(recipe, gpus=world).memory.stages[3]
        if zero3.grads_bytes + per_sample <= available:
            return ("deepspeed.zero_stage=3 deepspeed.offload_optimizer=true deepspeed.offload_param=true with a "
                    "small micro batch would fit")
    need = rank_bytes(recipe, world, on_gpu, 3)[0] + per_sample
    return (f"even ZeRO-3 at micro batch 1 needs {_gib(need)} GiB per rank: run on more processes (ranks) or "
            "machines with more memory")


def per_rank_states(recipe, gpus: Optional[int] = None) -> str:
    """One line for ``--dry-run``: the recipe's model built on the meta device (no allocation) and, for ``gpus``
    processes (default: the recipe's own world size, ``compute.gpus``) and its ZeRO stage, the bytes of parameters,
    gradients and optimizer states each rank holds."""
    r = estimate_result(recipe, gpus=gpus)
    stage = recipe.deepspeed.zero_stage
    st = r.memory.stages[stage]
    ranks = r.cluster.gpus
    extra = f" + {_gib(st.buffers_bytes)} GiB gathered-layer buffers" if st.buffers_bytes else ""
    return (f"model built on the meta device: {r.params.total:,} parameters; per rank on {ranks} ranks "
            f"(ZeRO-{stage}, {recipe.deepspeed.precision}): parameters {_gib(st.weights_bytes)} GiB, gradients "
            f"{_gib(st.grads_bytes)} GiB, optimizer states {_gib(st.optimizer_bytes)} GiB{extra} "
            f"(`evaclip estimate` for activations and the fit)")


# ------------------------------------------------------------------------------------------------ for telemetry
#: dense bf16/fp16 tensor-core peak by device name (``torch.cuda.get_device_name``), most specific name first
DEVICE_PEAKS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12),
                ("H100", 989e12), ("A100", 312e12))


def model_flops_per_sample(recipe, gpus: int) -> float:
    """Model FLOPs of one training sample (forward + backward, without recompute) when ``gpus`` devices train
    ``recipe``: the one formula behind ``evaclip estimate``, the run's telemetry and ``bench/gpu_check.py``."""
    return float(estimate_result(recipe, gpus=gpus).flops.model_per_sample)


def tokens_kept(recipe) -> tuple[int, int]:
    """(image, text) tokens per sample that the towers see after CLIPA's reduction (``tokens``)."""
    t = estimate_result(recipe, gpus=1).tokens
    return int(t.image), int(t.text)


def device_peak_flops(device_name: str, precision: str = "bf16", override_tflops: Optional[float] = None
                      ) -> Optional[float]:
    """Peak dense FLOP/s of one device: ``override_tflops`` (``compute.peak_tflops``) when given, else the table
    above by device name (TF32, half the bf16 peak, for fp32); None for an unknown device or a CPU."""
    if override_tflops:
        return override_tflops * 1e12
    peak = next((p for key, p in DEVICE_PEAKS if key.lower() in device_name.lower()), None)
    if peak is None:
        return None
    return peak / 2 if precision == "fp32" else peak


def telemetry_flops(recipe, world: int, device: str):
    """What a training run needs to log TFLOP/s and MFU (``engine.telemetry.FlopsModel``) on ``device``."""
    from evaclip_cli.engine.telemetry import FlopsModel

    name = ""
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name()
    image_tokens, text_tokens = tokens_kept(recipe)
    return FlopsModel(model_flops_per_sample(recipe, world),
                      device_peak_flops(name, recipe.deepspeed.precision, recipe.compute.peak_tflops),
                      image_tokens, text_tokens)
