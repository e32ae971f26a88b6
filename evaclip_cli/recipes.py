"""Recipes: TOML files validated by one pydantic schema, with ``extends`` and ``section.key=value`` overrides.

Shipped recipes live in ``evaclip_cli/recipe_files/`` (the repo's top-level ``recipes/`` points there), so
``--recipe 18b`` works from any directory; a path to a ``.toml`` works too.
"""
from __future__ import annotations

import copy
import difflib
import math
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evaclip_cli.errors import UserError
from evaclip_cli.models.specs import ClipSpec, resolve_arch

RECIPE_DIR = Path(__file__).parent / "recipe_files"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ------------------------------------------------------------------------------------------------------------ model
class VisionOverrides(_Section):
    image_size: Optional[int] = None
    patch_size: Optional[int] = None
    width: Optional[int] = None
    depth: Optional[int] = None
    heads: Optional[int] = None
    mlp_dim: Optional[int] = None
    norm: Optional[Literal["rms", "layer"]] = None
    qkv_bias: Optional[bool] = None
    qkv_fused: Optional[bool] = None
    post_norm: Optional[bool] = None
    rope: Optional[bool] = None
    swiglu: Optional[bool] = None
    subln: Optional[bool] = None
    rope_ref_size: Optional[int] = None
    head_bias: Optional[bool] = None
    norm_eps: Optional[float] = None
    drop_path: float = 0.0


class TextOverrides(_Section):
    width: Optional[int] = None
    heads: Optional[int] = None
    layers: Optional[int] = None
    context_length: Optional[int] = None
    vocab_size: Optional[int] = None
    mlp_ratio: Optional[float] = None
    norm_eps: Optional[float] = None


class LockSection(_Section):
    """Frozen towers, open_clip_train's ``--lock-image*`` / ``--lock-text*`` (LiT: ``image = true``). Frozen parameters
    get no gradients and no optimizer state (``models.clip.lock_towers``)."""

    image: bool = False  # freeze the image trunk (open_clip: the projection head stays trained)
    image_unlocked_groups: int = Field(0, ge=0)  # leave the last N groups trained (1: last block + final norm)
    image_freeze_bn_stats: bool = False  # BatchNorm statistics of frozen groups (EVA towers have none)
    text: bool = False  # freeze the text tower (embeddings, blocks, final norm, projection)
    text_unlocked_layers: int = Field(0, ge=0)  # leave the last N groups trained (1: projection, 2: + last block)
    text_freeze_layer_norm: bool = True  # false: the LayerNorms of frozen text layers stay trained


class ModelSection(_Section):
    arch: str = "tiny"  # 18b, 8b, 5b, b16, tiny, h14 or a reference config name (EVA-CLIP-18B, ...)
    embed_dim: Optional[int] = None
    vision: VisionOverrides = Field(default_factory=VisionOverrides)
    text: TextOverrides = Field(default_factory=TextOverrides)
    grad_checkpointing: bool = False
    lock: LockSection = Field(default_factory=LockSection)

    def spec(self) -> ClipSpec:
        base = resolve_arch(self.arch)
        v = {k: val for k, val in self.vision.model_dump().items() if val is not None and k != "drop_path"}
        t = {k: val for k, val in self.text.model_dump().items() if val is not None}
        upd: dict = {"vision": base.vision.model_copy(update=v), "text": base.text.model_copy(update=t)}
        if self.embed_dim is not None:
            upd["embed_dim"] = self.embed_dim
        return base.model_copy(update=upd)


# ------------------------------------------------------------------------------------------------------------- init
class InitSection(_Section):
    vision: Optional[str] = None  # distilled student (MIM layout) or evaclip/open_clip checkpoint
    text: Optional[str] = None  # EVA .pt or open_clip folder whose text tower initialises ours
    text_arch: Optional[str] = None  # released name for an EVA .pt without config (e.g. EVA02-CLIP-bigE-14-plus)
    # a whole CLIP to continue from (both towers, projections, logit_scale): a released name (EVA-CLIP-8B), an
    # hf-hub: source, a `train` run folder, an open_clip folder or a DeepSpeed checkpoint folder; the model section
    # is taken from it (fine-tuning, the video stage)
    clip: Optional[str] = None
    skip: list[str] = Field(default_factory=lambda: ["head", "lm_head", "mask_token", "rope", "fc_norm"])

    @field_validator("vision", "text", "text_arch", "clip")
    @classmethod
    def _empty_is_none(cls, v):
        return v or None


# ------------------------------------------------------------------------------------------------------------- data
class Source(_Section):
    shards: str  # brace-expandable webdataset URL/path, or a CSV manifest for video
    weight: float = 1.0
    kind: Literal["image", "video"] = "image"
    # where the caption is: a member extension ("txt", img2dataset's default) or "json:FIELD" (a field of the .json
    # member, dots for nesting; img2dataset writes the caption there too, as "caption")
    caption: str = "txt"

    @field_validator("caption")
    @classmethod
    def _caption_spec(cls, v):
        v = v.strip()
        if not v or (v.startswith("json:") and not v[5:]) or "/" in v:
            raise ValueError("caption must be a member extension (e.g. \"txt\") or \"json:FIELD\" (e.g. "
                             "\"json:caption\")")
        return v


class AugSection(_Section):
    scale: tuple[float, float] = (0.9, 1.0)
    hflip: bool = False
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"


class DataSection(_Section):
    train: list[Source] = Field(default_factory=list)
    val: Optional[str] = None
    demo: bool = False  # train on the embedded demo data (made on the fly when missing)
    samples: int = 0  # total training samples seen (0: one pass for epoch-based data)
    global_batch: int = 256
    micro_batch: int = 32  # per GPU per step; accumulation = global / (micro * gpus)
    # the negatives of the contrastive loss: "global" = the whole global batch, also under gradient accumulation
    # (features of every micro batch first, without grad; then each micro batch again with grad against them, as
    # open_clip_train's --accum-freq); "micro" = micro batch x ranks (cheaper: no second forward). MIM distillation
    # has no negatives and ignores it
    contrastive_batch: Literal["global", "micro"] = "global"
    resampled: bool = True
    shuffle_buffer: int = 1000
    workers: int = 2
    # stop with one line when this many samples in a row were skipped (corrupt, or missing an image or caption):
    # the data is not what the recipe describes (e.g. captions in .json, not .txt)
    max_skipped_in_a_row: int = 1000
    aug: AugSection = Field(default_factory=AugSection)

    @field_validator("global_batch", "micro_batch")
    @classmethod
    def _positive(cls, v):
        if v <= 0:
            raise ValueError("must be positive")
        return v


# -------------------------------------------------------------------------------------------------------- optimizer
class OptimizerSection(_Section):
    name: Literal["lamb", "adamw"] = "adamw"
    lr: float = 5e-4  # vision (or whole-model) lr
    text_lr: Optional[float] = None  # default: lr
    weight_decay: float = 0.05
    text_weight_decay: Optional[float] = None
    layer_decay: float = 1.0  # vision layer-wise lr decay (1: off)
    text_layer_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6


class ScheduleSection(_Section):
    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


# -------------------------------------------------------------------------------------------------------- deepspeed
class DeepSpeedSection(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float = 1.0  # always written to the DeepSpeed config (its default changed to 1.0)
    offload_optimizer: bool = False
    offload_param: bool = False
    zero_init: bool = True  # build the model sharded under zero.Init at stage 3
    extra: dict[str, Any] = Field(default_factory=dict)  # merged last into the generated DeepSpeed config


# ---------------------------------------------------------------------------------------------------------- tokens
class ImageTokens(_Section):
    method: Literal["none", "resize", "random", "grid", "block"] = "none"
    image_size: Optional[int] = None  # resize: train at this resolution (position embedding resampled)
    keep_ratio: float = 1.0  # random/grid/block masking: fraction of patches kept

    @field_validator("keep_ratio")
    @classmethod
    def _ratio(cls, v):
        if not 0.0 < v <= 1.0:
            raise ValueError("keep_ratio must be in (0, 1]")
        return v


class TextTokens(_Section):
    method: Literal["none", "truncate", "random", "block", "syntax"] = "none"
    length: Optional[int] = None  # tokens kept (incl. SOT/EOT)


class TokensSection(_Section):
    """CLIPA-v2 token reduction ("inverse scaling"): fewer image/text tokens per sample while training."""

    image: ImageTokens = Field(default_factory=ImageTokens)
    text: TextTokens = Field(default_factory=TextTokens)


# --------------------------------------------------------------------------------------------------------- distill
class DistillSection(_Section):
    teacher: Optional[str] = None  # open_clip folder, EVA .pt, evaclip checkpoint
    teacher_arch: str = "5b"  # arch of the teacher (or its reference config name)
    mask_ratio: float = 0.4
    min_mask_patches: int = 16
    mask_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    teacher_precision: Literal["fp32", "bf16", "fp16"] = "bf16"

    @field_validator("teacher")
    @classmethod
    def _empty_is_none(cls, v):
        return v or None


# ----------------------------------------------------------------------------------------------------------- video
class VideoSection(_Section):
    frames: int = 8  # frames per clip (uniform segments; their embeddings are averaged)
    image_weight: float = 1.0  # image shards mixed in by weight (multiplies each image source's weight)
    video_weight: float = 1.0  # multiplies each video source's weight
    jitter: bool = True  # a random frame per segment while training (segment centres when false)

    @field_validator("frames")
    @classmethod
    def _frames(cls, v):
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @field_validator("image_weight", "video_weight")
    @classmethod
    def _weight(cls, v):
        if v < 0:
            raise ValueError("must be >= 0 (0 leaves that kind of source out)")
        return v


# ------------------------------------------------------------------------------------------------------------ eval
class EvalDataset(_Section):
    name: str
    path: str
    task: Literal["zeroshot", "retrieval", "video"] = "zeroshot"
    images: Optional[str] = None  # retrieval: the images folder of a caption JSON (`evaclip eval retrieval --images`)


class EvalSection(_Section):
    every_steps: int = 0  # 0: only at the end
    datasets: list[EvalDataset] = Field(default_factory=list)
    batch_size: int = 256


# --------------------------------------------------------------------------------------------------------- logging
class WandbSection(_Section):
    """Weights & Biases, open_clip_train's ``--report-to wandb``: rank 0 logs the resolved recipe as the run config,
    the TensorBoard scalars (train/*, eval/*), an eval table and curves.png; a resumed run continues the same wandb
    run (its id is kept in RUN/wandb_run_id). Needs ``pip install 'evaclip[wandb]'``."""

    enabled: bool = False
    project: str = "evaclip"
    entity: Optional[str] = None  # team or user; default: wandb's default entity
    name: Optional[str] = None  # run name; default: the recipe name
    group: Optional[str] = None
    tags: list[str] = Field(default_factory=list)
    notes: Optional[str] = None
    mode: Optional[Literal["online", "offline", "disabled"]] = None  # default: $WANDB_MODE, else online


class LoggingSection(_Section):
    out_dir: str = "runs/{name}"
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_last: int = 3
    tensorboard: bool = True
    wandb: WandbSection = Field(default_factory=WandbSection)
    max_bad_steps: int = 10  # consecutive NaN/inf losses before the run stops

    @field_validator("wandb", mode="before")
    @classmethod
    def _wandb_switch(cls, v):  # `logging.wandb = true` is short for `[logging.wandb] enabled = true`
        return {"enabled": v} if isinstance(v, bool) else v


class GuardSection(_Section):
    """The spike guard (engine/guard.py): a step whose loss is more than ``sigma`` standard deviations above the mean
    of the last ``window`` applied steps is not applied; ``rollback_after`` skips within ``rollback_window`` steps
    roll back to the last checkpoint and skip the batches read since (PaLM's remedy)."""

    enabled: bool = False
    sigma: float = Field(6.0, gt=0)
    window: int = Field(100, ge=2)
    min_history: int = Field(20, ge=2)  # applied steps before the guard judges (early losses fall fast)
    rollback_after: int = Field(3, ge=0)  # 0: skip spikes, never roll back
    rollback_window: int = Field(100, ge=1)


# --------------------------------------------------------------------------------------------------------- compute
class ComputeSection(_Section):
    """The cluster the recipe was written for; ``estimate`` uses it (and ``--gpu/--gpus/--hours`` override)."""

    gpu: Literal["a100-40g", "a100-80g", "h100"] = "a100-40g"
    gpus: int = 8
    reported_hours: Optional[float] = None  # wall-clock hours the paper reports for this recipe
    # intra-op CPU threads per training process; 0: the CPUs this process may use (affinity, cgroup quota) divided by
    # the ranks on this machine (OMP_NUM_THREADS, when set, wins over 0)
    threads: int = Field(0, ge=0)
    # dense bf16 TFLOP/s of one device for MFU (telemetry, bench/gpu_check.py); default: the estimator's GPU table
    peak_tflops: Optional[float] = Field(None, gt=0)
    # signals that stop a run gracefully: every rank finishes the same step, writes a checkpoint, exits with 75
    stop_signals: list[str] = Field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # the sbatch script: slurm sends SIGUSR1 this many seconds before the time limit (#SBATCH --signal=B:USR1@N)
    stop_lead_s: int = Field(600, ge=0)
    # the sbatch script requeues a gracefully stopped job (exit 75) at most this many times; a failure never
    max_requeues: int = Field(20, ge=0)

    @field_validator("stop_signals")
    @classmethod
    def _signal_names(cls, v: list[str]) -> list[str]:
        import signal

        bad = [s for s in v if not (s.startswith("SIG") and isinstance(getattr(signal, s, None), signal.Signals))
               or s in ("SIGKILL", "SIGSTOP")]
        if bad:
            raise ValueError(f"compute.stop_signals: {', '.join(bad)} cannot be caught (names like SIGTERM, SIGUSR1)")
        return v


class Recipe(_Section):
    name: str = "unnamed"
    description: str = ""
    stage: Literal["train", "distill", "video"] = "train"
    seed: int = 0
    model: ModelSection = Field(default_factory=ModelSection)
    init: InitSection = Field(default_factory=InitSection)
    data: DataSection = Field(default_factory=DataSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    tokens: TokensSection = Field(default_factory=TokensSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    video: VideoSection = Field(default_factory=VideoSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    guard: GuardSection = Field(default_factory=GuardSection)
    compute: ComputeSection = Field(default_factory=ComputeSection)

    @model_validator(mode="before")
    @classmethod
    def _model_from_init_clip(cls, raw):
        """A whole CLIP to start from (``init.clip``) sets the model section: its shapes, not hand-written ones."""
        if not isinstance(raw, dict) or raw.get("stage", "train") == "distill" \
                or not isinstance(raw.get("model", {}), dict):
            return raw
        src = (raw.get("init") or {}).get("clip") if isinstance(raw.get("init"), dict) else None
        if not src or not isinstance(src, str):
            return raw
        spec = init_clip_spec(src)
        if spec is None:  # a Hub source or a folder not there yet: the stage reads it at start (with_source_model)
            return raw
        return {**raw, "model": model_from_spec(raw.get("model") or {}, spec, src)}

    @model_validator(mode="after")
    def _check(self):
        spec = self.model.spec()
        v = spec.vision
        if v.width % v.heads:
            raise ValueError(f"model.vision.width {v.width} is not divisible by heads {v.heads}")
        if v.image_size % v.patch_size:
            raise ValueError(f"model.vision.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if self.data.global_batch % self.data.micro_batch:
            raise ValueError(f"data.global_batch {self.data.global_batch} is not a multiple of data.micro_batch "
                             f"{self.data.micro_batch}")
        img = self.tokens.image
        if img.method == "resize" and not img.image_size:
            raise ValueError("tokens.image.method = 'resize' needs tokens.image.image_size")
        if img.method == "resize" and img.image_size and img.image_size % v.patch_size:
            raise ValueError(f"tokens.image.image_size {img.image_size} is not a multiple of patch_size {v.patch_size}")
        if self.init.clip and self.stage == "distill":
            raise ValueError("init.clip (a whole CLIP to continue from) is read by the train and video stages; "
                             "distill takes init.vision")
        both = [f"init.{k} = '{v}'" for k, v in (("vision", self.init.vision), ("text", self.init.text)) if v]
        if self.init.clip and both:
            raise ValueError(f"init.clip = '{self.init.clip}' initialises both towers, and {' and '.join(both)} too: "
                             "set init.vision=\"\" and init.text=\"\" (or drop init.clip)")
        if self.tokens.text.method != "none" and not self.tokens.text.length:
            raise ValueError(f"tokens.text.method = '{self.tokens.text.method}' needs tokens.text.length")
        return self

    # ---- derived quantities shared by train / estimate ----------------------------------------------------------
    def spec(self) -> ClipSpec:
        return self.model.spec()

    @property
    def steps(self) -> int:
        return math.ceil(self.data.samples / self.data.global_batch) if self.data.samples else 0

    def train_image_size(self) -> int:
        t = self.tokens.image
        return t.image_size if t.method == "resize" and t.image_size else self.spec().vision.image_size

    def image_tokens(self) -> int:
        """Sequence length the vision tower sees while training (CLS included), after token reduction."""
        v = self.spec().vision
        grid = self.train_image_size() // v.patch_size
        patches = grid * grid
        if self.tokens.image.method in ("random", "grid", "block"):
            patches = max(1, int(patches * self.tokens.image.keep_ratio))
        return patches + 1

    def text_tokens(self) -> int:
        t = self.tokens.text
        ctx = self.spec().text.context_length
        return min(ctx, t.length) if t.method != "none" and t.length else ctx

    def out_dir(self) -> Path:
        return Path(self.logging.out_dir.format(name=self.name))


# ================================================================================================ init.clip
#: model keys a fine-tune may set beside init.clip (the position embedding is resampled to another image size)
_FREE_KEYS = {"image_size", "drop_path"}


def init_clip_spec(src: str) -> Optional[ClipSpec]:
    """The model of ``init.clip`` when it is known without downloading anything: a released name (its row of
    ``models.specs.RELEASED``), a local open_clip folder, an evaclip run folder or its checkpoints (the run's
    recipe). None for a Hub source or a path that is not there yet: the stage reads those at start."""
    import json

    from evaclip_cli.models.specs import RELEASED, spec_from_open_clip_cfg

    if src in RELEASED:
        rel = RELEASED[src]
        if rel.layout == "mim":
            raise ValueError(f"init.clip = '{src}' is a vision-only MIM encoder; init.clip needs a whole CLIP (e.g. "
                             f"'{src.replace('EVA-', 'EVA-CLIP-')}'); use init.vision for a vision tower")
        return rel.spec()
    p = Path(src).expanduser()
    for cfg in (p / "open_clip_config.json", p / "final" / "open_clip_config.json"):
        if cfg.is_file():
            try:
                return spec_from_open_clip_cfg(json.loads(cfg.read_text()))
            except (UserError, KeyError, TypeError, ValueError, OSError) as e:
                raise ValueError(f"init.clip: {cfg}: not an EVA-CLIP open_clip config ({e})") from None
    runs = [p]
    if p.name == "checkpoints" or p.name.startswith("global_step"):
        runs += [p.parent, p.parent.parent]
    for run in runs:
        if (run / "evaclip_recipe.toml").is_file():
            return load_recipe(str(run / "evaclip_recipe.toml")).recipe.spec()
    return None


def model_from_spec(model: dict, spec: ClipSpec, src: str) -> dict:
    """The recipe's ``model`` section (raw) with every shape of ``spec`` written out; a shape the recipe sets to
    something else is refused (``model.vision.image_size``, ``drop_path`` and the non-shape keys stay the recipe's)."""
    from evaclip_cli.models.specs import ARCHS, RELEASED

    out = copy.deepcopy(model)
    for part, want in (("vision", spec.vision.model_dump()), ("text", spec.text.model_dump())):
        given = dict(out.get(part) or {})
        for key, value in want.items():
            if key in _FREE_KEYS and given.get(key) is not None:
                continue
            if given.get(key) is not None and given[key] != value:
                raise ValueError(f"model.{part}.{key} = {given[key]!r}, but init.clip ({src}) has {value!r}: the "
                                 f"model's shapes come from init.clip; remove model.{part}.{key}")
            given[key] = value
        out[part] = given
    if out.get("embed_dim") is not None and out["embed_dim"] != spec.embed_dim:
        raise ValueError(f"model.embed_dim = {out['embed_dim']!r}, but init.clip ({src}) has {spec.embed_dim}: the "
                         "model's shapes come from init.clip; remove model.embed_dim")
    out["embed_dim"] = spec.embed_dim
    named = [k for k, a in ARCHS.items() if a.vision == spec.vision and a.text == spec.text]
    out["arch"] = src if src in RELEASED else named[0] if named else out.get("arch", "tiny")
    return out


def with_source_model(recipe: Recipe, spec: ClipSpec) -> Recipe:
    """``recipe`` with its model section taken from ``spec`` (``init.clip`` read by the stage: a Hub source)."""
    raw = recipe.model_dump(mode="json", exclude_none=True)
    try:
        raw["model"] = model_from_spec(raw["model"], spec, str(recipe.init.clip))
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(_explain(err, {}, "init.clip")) from None
    except ValueError as err:
        raise UserError(str(err)) from None


# ====================================================================================================== loading
class Loaded:
    """A resolved recipe plus where each key came from."""

    def __init__(self, recipe: Recipe, raw: dict, sources: dict[str, str], chain: list[str]):
        self.recipe, self.raw, self.sources, self.chain = recipe, raw, sources, chain


def builtin_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def find_recipe(name_or_path: str, relative_to: Optional[Path] = None) -> Path:
    p = Path(name_or_path)
    candidates = []
    if p.suffix == ".toml" or p.is_file():  # a folder named like a recipe is not one
        if relative_to is not None and not p.is_absolute():
            candidates.append(relative_to / p)
        candidates.append(p)
    else:
        if relative_to is not None:
            candidates.append(relative_to / f"{name_or_path}.toml")
        candidates.append(RECIPE_DIR / f"{name_or_path}.toml")
    for c in candidates:
        if c.is_file():
            return c
    close = difflib.get_close_matches(name_or_path, builtin_names(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UserError(f"recipe '{name_or_path}' not found{hint}: give a shipped name ({', '.join(builtin_names())}) "
                    "or a path to a .toml file")


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); TOML files "
                        "are UTF-8: re-save the recipe as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_chain(path: Path, seen: tuple = ()) -> tuple[dict, dict[str, str], list[str]]:
    path = path.resolve()
    if path in seen:
        raise UserError(f"{path}: 'extends' forms a cycle ({' -> '.join(p.name for p in (*seen, path))})")
    raw = _read_toml(path)
    parent_name = raw.pop("extends", None)
    if parent_name is not None and not isinstance(parent_name, str):
        raise UserError(f"{path}: 'extends' must be a recipe name or path (a string)")
    if parent_name:
        try:
            parent_path = find_recipe(parent_name, relative_to=path.parent)
        except UserError as e:
            raise UserError(f"{path}: extends = \"{parent_name}\": {e}") from None
        base, sources, chain = _load_chain(parent_path, (*seen, path))
    else:
        base, sources, chain = {}, {}, []
    for key in _flatten(raw):
        sources[key] = str(path)
    merged = _merge(base, raw)
    if "name" not in raw:
        merged["name"] = path.stem
    return merged, sources, [*chain, str(path)]


def parse_value(text: str) -> Any:
    """A command-line value: TOML syntax if it parses (numbers, booleans, arrays, quoted strings), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict, sources: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form section.key=value (e.g. optimizer.lr=1e-4)")
        key, value = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise UserError(f"override '{item}': empty key segment")
        node = raw
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise UserError(f"override '{item}': '{p}' is a value, not a section")
            node = nxt
        node[parts[-1]] = parse_value(value)
        sources[key] = "command line"
    return raw


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the schema section at ``loc`` (for 'did you mean')."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cand = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        for a in args:
            cand += [b for b in getattr(a, "__args__", ()) if isinstance(b, type) and issubclass(b, BaseModel)]
        if not cand:
            return []
        model = cand[0]
    return list(getattr(model, "model_fields", {}))


# names users bring from other trainers (open_clip, timm, DeepSpeed) -> ours
_SYNONYMS = {
    "learning_rate": "lr", "base_lr": "lr", "lr_text": "text_lr", "wd": "weight_decay", "clip_grad": "grad_clip",
    "gradient_clipping": "grad_clip", "max_grad_norm": "grad_clip", "batch_size": "micro_batch",
    "train_batch_size": "global_batch", "warmup": "warmup_steps", "zero": "zero_stage", "stage": "zero_stage",
    "ld": "layer_decay", "layer_decay_rate": "layer_decay", "opt": "name", "optimizer": "name",
    "num_samples": "samples", "train_num_samples": "samples", "model": "arch", "precision": "precision",
    "grad_checkpointing": "grad_checkpointing", "epochs": "samples", "beta": "betas", "report_to": "wandb",
}


def closest_key(key: str, valid: list[str]) -> Optional[str]:
    """The valid key a user most likely meant (synonyms first, then spelling); None if nothing is close."""
    if not valid:
        return None
    syn = _SYNONYMS.get(key.lower())
    if syn in valid:
        return syn
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return close[0]
    parts = set(key.lower().replace("-", "_").split("_"))
    overlap = [v for v in valid if parts & set(v.split("_"))]
    return overlap[0] if overlap else None


def _explain(err: ValidationError, sources: dict[str, str], default_src: str) -> str:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    dotted = ".".join(str(p) for p in loc)
    # where the offending key came from: itself, or (an unknown section) the keys under it
    src = sources.get(dotted) or next((v for k, v in sources.items() if k.startswith(dotted + ".")), default_src)
    if e["type"] == "extra_forbidden":
        valid = _fields_at(loc[:-1])
        close = closest_key(str(loc[-1]), valid)
        prefix = ".".join(str(p) for p in loc[:-1]) + "." if len(loc) > 1 else ""
        if isinstance(e.get("input"), dict):  # a whole section the schema does not have
            hint = f"; did you mean '{prefix}{close}'?" if close else f" (valid: {', '.join(valid)})"
            return f"{src}: unknown section '{dotted}'{hint}"
        hint = f"; did you mean '{prefix}{close}'? (valid: {', '.join(valid)})" if close else ""
        return f"{src}: unknown key '{dotted}'{hint}"
    msg = e["msg"].removeprefix("Value error, ")
    if not loc:
        return f"{src}: {msg}"
    return f"{src}: '{dotted}': {msg} (got {e.get('input')!r})"


def load_recipe(name_or_path: str, overrides: Optional[list[str]] = None) -> Loaded:
    path = find_recipe(name_or_path)
    raw, sources, chain = _load_chain(path)
    raw = apply_overrides(raw, sources, overrides or [])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(_explain(err, sources, str(path))) from None
    except UserError as err:  # e.g. unknown model.arch, raised while resolving the spec
        src = sources.get("model.arch", str(path))
        raise UserError(f"{src}: {err}") from None
    return Loaded(recipe, raw, sources, chain)


def recipe_to_toml(recipe: Recipe) -> str:
    import tomli_w

    data = recipe.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)


def describe(path: Path) -> str:
    raw = _read_toml(path)
    return str(raw.get("description", ""))


def copy_recipe(name: str, dest: Union[str, Path], overrides: Optional[list[str]] = None, force=False) -> Path:
    """Write the resolved recipe (extends flattened) to DEST so it can be edited on its own."""
    loaded = load_recipe(name, overrides)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / f"{loaded.recipe.name}.toml"
    if dest.exists() and not force:
        raise UserError(f"{dest} exists; pass --force to overwrite")
    header = f"# copied from recipe '{name}' by evaclip recipes cp; extends resolved\n"
    text = header + recipe_to_toml(loaded.recipe)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(dest)
    except OSError as e:
        raise UserError(f"cannot write {dest} ({e.strerror})") from None
    return dest
