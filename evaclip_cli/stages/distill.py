"""``evaclip distill``: weak-to-strong MIM distillation (EVA-02 recipe) on the shared engine.

A frozen EVA-CLIP teacher's final-layer patch features (after its final norm and CLIP projection, CLS dropped) are
the targets; the student — the recipe's EVA vision tower plus a learned ``mask_token`` and an ``lm_head`` to the
teacher's embedding width — sees the image with ~40% of its patches (BEiT block-wise masking) replaced by the mask
token and predicts the targets at the masked positions. Loss: negative cosine similarity (so it is negative by
design; -1 is perfect). The teacher sits inside the engine's module, frozen, so under ZeRO-3 it is partitioned like
the student, and it runs in the engine's precision.

Outputs in the run folder: ``final/`` (a timm tower folder; ``mim_extras.safetensors`` keeps mask_token/lm_head),
``student_mim.pt`` (the reference MIM layout: ``blocks.*``, ``mask_token``, ``lm_head.*``). ``evaclip train`` takes
either as ``init.vision``; ``evaclip convert`` exports them.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from evaclip_cli import atomic
from evaclip_cli.engine.params import TowerCfg, clip_layer_id
from evaclip_cli.engine.stage import LoaderStage
from evaclip_cli.errors import UserError
from evaclip_cli.models.clip import torch_dtype

if TYPE_CHECKING:
    from evaclip_cli.recipes import Recipe


def block_mask(grid: int, ratio: float, min_patches: int, aspect: tuple[float, float], rng: random.Random):
    """BEiT block-wise masking: rectangles of random area (>= min_patches) and aspect ratio until ~ratio of the
    grid is masked. Returns a list of grid*grid booleans."""
    import numpy as np

    total = grid * grid
    target = int(round(total * ratio))
    mask = np.zeros((grid, grid), dtype=bool)
    min_p = max(1, min(min_patches, target))
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count, tries = 0, 0
    while count < target and tries < 100:
        tries += 1
        left = target - count
        for _ in range(10):
            area = rng.uniform(min_p, max(min_p, left))
            ar = math.exp(rng.uniform(*log_aspect))
            h = max(1, min(grid, int(round(math.sqrt(area * ar)))))
            w = max(1, min(grid, int(round(math.sqrt(area / ar)))))
            top, lft = rng.randint(0, grid - h), rng.randint(0, grid - w)
            new = int((~mask[top:top + h, lft:lft + w]).sum())
            if 0 < new <= left:
                mask[top:top + h, lft:lft + w] = True
                count += new
                break
    if count < target:  # small grids: top up at random so the ratio holds
        free = [i for i in range(total) if not mask.flat[i]]
        rng.shuffle(free)
        for i in free[:target - count]:
            mask.flat[i] = True
    return mask.reshape(-1).tolist()


def _build_distill_model(student_spec, teacher_spec, teacher_embed: int):
    import torch
    from torch import nn

    from evaclip_cli.models.clip import _imports, build_visual

    _imports()
    import timm

    class MimStudent(nn.Module):
        def __init__(self):
            super().__init__()
            v = student_spec.vision
            self.trunk = timm.create_model("evaclip_vit", **v.timm_kwargs())
            self.mask_token = nn.Parameter(torch.zeros(1, 1, v.width))
            self.lm_head = nn.Linear(v.width, teacher_embed)
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
            nn.init.zeros_(self.lm_head.bias)
            self._mask = None
            self.trunk.patch_embed.register_forward_hook(self._apply_mask)

        def _apply_mask(self, module, inputs, out):
            if self._mask is None:
                return out
            w = self._mask.unsqueeze(-1).to(out.dtype)
            return out * (1 - w) + self.mask_token.to(out.dtype) * w

        def forward(self, images, mask):
            self._mask = mask
            try:
                x = self.trunk.forward_features(images)
            finally:
                self._mask = None
            return self.lm_head(x[:, self.trunk.num_prefix_tokens:])

    class DistillModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = MimStudent()
            self.teacher = build_visual(teacher_spec)
            for p in self.teacher.parameters():
                p.requires_grad_(False)

        def train(self, mode: bool = True):
            super().train(mode)
            self.teacher.eval()
            return self

        def forward(self, images, mask):
            with torch.no_grad():
                feats = self.teacher.trunk.forward_features(images)
                target = self.teacher.head(feats[:, self.teacher.trunk.num_prefix_tokens:])
            pred = self.student(images, mask)
            return pred, target

    return DistillModel()


def load_teacher_state(path: str, spec) -> dict:
    """The teacher's vision tower (open_clip layout, ``visual.*``) from any checkpoint evaclip reads."""
    from evaclip_cli.checkpoints.init import read_any

    state = read_any(path, separate_qkv=not spec.vision.qkv_fused)
    vis = {k: v for k, v in state.items() if k.startswith("visual.")}
    if not any(k.startswith("visual.head.") for k in vis):
        raise UserError(f"{path}: the teacher needs its CLIP projection (visual.head), the target is the projected "
                        "patch features; give a CLIP checkpoint, not a bare tower")
    return vis


def teacher_spec_for(recipe: Recipe):
    from evaclip_cli.models.openclip_compat import CONFIG_NAME
    from evaclip_cli.models.specs import RELEASED, parse_open_clip_tag, resolve_arch, spec_from_open_clip_cfg

    t = recipe.distill.teacher
    if t and (Path(t) / CONFIG_NAME).is_file():
        import json

        return spec_from_open_clip_cfg(json.loads((Path(t) / CONFIG_NAME).read_text()))
    if t and not Path(t).exists() and (t in RELEASED or parse_open_clip_tag(t)):
        return resolve_arch(t)  # a released name or an open_clip tag says its own architecture
    return resolve_arch(recipe.distill.teacher_arch)


class DistillStage(LoaderStage):
    name = "distill"

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.spec = recipe.spec()
        self.teacher_spec = teacher_spec_for(recipe)
        if not recipe.distill.teacher:
            raise UserError("distill.teacher is not set: give the teacher CLIP (open_clip folder, EVA .pt or evaclip "
                            "run), e.g. distill.teacher=runs/tiny/final")
        if self.teacher_spec.vision.grid != self.spec.vision.grid:
            raise UserError(f"teacher patch grid {self.teacher_spec.vision.grid}x{self.teacher_spec.vision.grid} "
                            f"differs from the student's {self.spec.vision.grid}x{self.spec.vision.grid}: use the "
                            "same image_size/patch_size ratio")
        self._data: Any = None

    def build_model(self, ctx):
        import contextlib

        from evaclip_cli.models.clip import _imports

        _imports()  # open_clip/timm/torchvision (and torch._dynamo) before zero.Init, never inside it
        zero3 = ctx.zero_init
        if zero3:
            import deepspeed

            cm = deepspeed.zero.Init(config_dict_or_path=ctx.ds_config)
        else:
            cm = contextlib.nullcontext()
        with cm:
            model = _build_distill_model(self.spec, self.teacher_spec, self.teacher_spec.embed_dim)
        state = load_teacher_state(str(self.recipe.distill.teacher), self.teacher_spec) \
            if ctx.info.is_main or not zero3 else {}
        if zero3:
            from evaclip_cli.checkpoints.init import _Shape
            from evaclip_cli.engine.dist import all_gather_object

            meta = all_gather_object({k: tuple(v.shape) for k, v in state.items()} if ctx.info.is_main else None)[0]
            if not ctx.info.is_main:
                state = {k: _Shape(s) for k, s in meta.items()}
        teacher_state = {"teacher." + k[len("visual."):]: v for k, v in state.items()}
        res = load_teacher_tower(model, teacher_state, ctx, zero3)
        ctx.print(f"teacher {self.recipe.distill.teacher}: {res['loaded']} tensors, frozen; student "
                  f"{self.spec.vision.width}w/{self.spec.vision.depth}d -> lm_head to {self.teacher_spec.embed_dim}")
        if self.recipe.model.grad_checkpointing:
            model.student.trunk.set_grad_checkpointing(True)
        if self.recipe.init.vision:  # continue from an earlier student
            from evaclip_cli.checkpoints.init import read_any

            st = read_any(self.recipe.init.vision, not self.spec.vision.qkv_fused)
            st = {"student.trunk." + k[len("visual.trunk."):]: v for k, v in st.items()
                  if k.startswith("visual.trunk.")}
            load_teacher_tower(model, st, ctx, zero3, prefix="student.trunk.")
        return model

    def towers(self, ctx):
        o = self.recipe.optimizer
        return {"vision": TowerCfg(o.lr, o.weight_decay, o.layer_decay, self.spec.vision.depth)}

    def layer_id(self, name):
        n = name.removeprefix("student.")
        if n.startswith("lm_head"):
            return "vision", self.spec.vision.depth + 1
        if n.startswith("mask_token"):
            return "vision", 0
        return clip_layer_id(n, self.spec.vision.depth, 0)

    def build_loader(self, ctx, state):
        from evaclip_cli.data.wds import build_train_loader
        from evaclip_cli.stages.common import ensure_demo, shard_pattern

        r = self.recipe
        if r.data.demo:
            from evaclip_cli.recipes import Source

            root = ensure_demo(ctx.info.is_main, ctx.console)
            sources = [Source(shards=shard_pattern(root / "train"))]
        else:
            if not r.data.train:
                raise UserError("the recipe has no data.train sources (image shards; captions are ignored)")
            sources = [s for s in r.data.train if s.kind == "image"]
        d = r.distill
        self._data = build_train_loader(
            sources, image_size=self.spec.vision.image_size, micro_batch=r.data.micro_batch, workers=r.data.workers,
            tokenizer=None, seed=r.seed, rank=ctx.info.rank, world_size=ctx.info.world_size,
            resampled=r.data.resampled, shuffle_buffer=r.data.shuffle_buffer, scale=tuple(d.scale),
            interpolation=r.data.aug.interpolation, hflip=d.hflip, start_state=state,
            max_skipped=r.data.max_skipped_in_a_row)
        return self._data

    def loss(self, ctx, batch, step):
        import torch
        import torch.nn.functional as F

        r, d = self.recipe, self.recipe.distill
        dtype = torch_dtype(r.deepspeed.precision)
        images = batch["image"].to(ctx.device, dtype=dtype)
        rng = random.Random(hash((r.seed, step, ctx.info.rank, ctx.engine.micro_steps)))
        grid = self.spec.vision.grid
        masks = [block_mask(grid, d.mask_ratio, d.min_mask_patches, (d.mask_aspect[0], d.mask_aspect[1]), rng)
                 for _ in range(images.shape[0])]
        mask = torch.tensor(masks, dtype=torch.bool, device=ctx.device)
        pred, target = ctx.engine(images, mask)
        loss = -F.cosine_similarity(pred[mask].float(), target[mask].float(), dim=-1).mean()
        return loss, {"masked_fraction": float(mask.float().mean())}

    def finish(self, ctx):
        """Export the student: a timm tower folder (final/) and the MIM layout (student_mim.pt)."""
        from evaclip_cli.checkpoints.deepspeed import load_deepspeed_state
        from evaclip_cli.checkpoints.folders import write_timm_folder
        from evaclip_cli.checkpoints.io import write_torch_file
        from evaclip_cli.engine import dist
        from evaclip_cli.models.keymaps import open_clip_to_eva
        from evaclip_cli.models.specs import ClipSpec

        if ctx.info.is_main:
            state = load_deepspeed_state(ctx.out_dir / "checkpoints")
            trunk = {"visual.trunk." + k[len("student.trunk."):]: v for k, v in state.items()
                     if k.startswith("student.trunk.")}
            extras = {k[len("student."):]: v for k, v in state.items()
                      if k.startswith(("student.mask_token", "student.lm_head."))}
            spec = ClipSpec(vision=self.spec.vision)
            write_timm_folder(trunk, spec, ctx.out_dir / "final", extras=extras, force=True)
            mim = {k[len("visual."):]: v for k, v in open_clip_to_eva(trunk, not spec.vision.qkv_fused).items()}
            with atomic.atomic_file(ctx.out_dir / "student_mim.pt") as tmp:  # streamed, as the timm folder
                write_torch_file(tmp, {**mim, **extras})
            ctx.print(f"student: {ctx.out_dir / 'final'} (timm folder), {ctx.out_dir / 'student_mim.pt'} (MIM layout)")
        dist.barrier()


def load_teacher_tower(model, state, ctx, zero3, prefix="teacher."):
    from evaclip_cli.checkpoints.init import load_into

    return load_into(model, state, prefix, skip=[], where=str(ctx.recipe.distill.teacher), is_main=ctx.info.is_main,
                     zero3=zero3)


def run_distill(recipe: Recipe, out_dir: Optional[Path] = None, resume: Optional[str] = None, quiet: bool = False,
                accept_changes: bool = False) -> dict:
    from evaclip_cli.engine import dist
    from evaclip_cli.engine.loop import run
    from evaclip_cli.estimate import telemetry_flops

    stage = DistillStage(recipe)
    result = run(recipe, stage, out_dir=out_dir, resume=resume, quiet=quiet, accept_changes=accept_changes,
                 flops=lambda world, device: telemetry_flops(recipe, world, device))
    if dist.is_multi():
        dist.shutdown()
    return result
