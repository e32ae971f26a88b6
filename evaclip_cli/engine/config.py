"""The DeepSpeed config, built from a recipe's ``data`` and ``deepspeed`` sections."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from evaclip_cli.errors import UserError

if TYPE_CHECKING:
    from evaclip_cli.recipes import Recipe


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise UserError(f"data.global_batch {global_batch} is not a multiple of data.micro_batch {micro_batch} × "
                        f"{world_size} processes = {per_step}; change the batch or the process count")
    return global_batch // per_step


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def reduce_bucket_elems(recipe: Recipe, on_gpu: bool) -> int:
    """The gradient bucket (elements) of ZeRO >= 1: a recipe's ``deepspeed.extra`` wins over evaclip's default."""
    extra = (recipe.deepspeed.extra or {}).get("zero_optimization", {})
    return int(float(extra.get("reduce_bucket_size", 5e8 if on_gpu else 5e7)))


def deepspeed_config(recipe: Recipe, world_size: int, on_gpu: bool) -> dict:
    ds, data = recipe.deepspeed, recipe.data
    accum = accumulation_steps(data.global_batch, data.micro_batch, world_size)
    cfg: dict = {
        "train_micro_batch_size_per_gpu": data.micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": data.micro_batch * accum * world_size,
        # DeepSpeed's default changed to 1.0; always written (EVA: 5.0; 0 disables)
        "gradient_clipping": float(ds.grad_clip),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": {"stage": ds.zero_stage},
    }
    if ds.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    z = cfg["zero_optimization"]
    if ds.zero_stage >= 1:
        z.update(overlap_comm=on_gpu, contiguous_gradients=True, reduce_bucket_size=reduce_bucket_elems(recipe, on_gpu))
    if ds.zero_stage == 3:
        z.update(stage3_param_persistence_threshold=1e5 if on_gpu else 0,
                 stage3_gather_16bit_weights_on_model_save=False)
    if ds.offload_optimizer:
        if ds.zero_stage == 0:
            raise UserError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_param:
        if ds.zero_stage != 3:
            raise UserError("deepspeed.offload_param needs deepspeed.zero_stage = 3")
        z["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return _merge(cfg, ds.extra)
