"""``evaclip train``: contrastive CLIP training, the CLIP stage of the shared engine."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from evaclip_cli.engine.params import TowerCfg, clip_layer_id
from evaclip_cli.engine.stage import LoaderStage
from evaclip_cli.errors import UserError
from evaclip_cli.models.clip import torch_dtype
from evaclip_cli.stages.common import ensure_demo, shard_pattern

if TYPE_CHECKING:
    from evaclip_cli.recipes import Recipe


class ClipStage(LoaderStage):
    """Model, data and loss of contrastive image-text training; everything else is the engine's."""

    name = "train"

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.spec = recipe.spec()
        self._data: Any = None
        self.reducer: Any = None  # CLIPA's token reducer (models.tokens), when tokens.image masks patches
        self.eval_sets: list[tuple[str, Path]] = []  # zero-shot classification
        self.retrieval_sets: list[tuple[str, Path, Optional[Path]]] = []  # image-text retrieval (+ images folder)
        self.video_sets: list[tuple[str, Path]] = []  # video classification or retrieval (the middle frame here)
        self.tokenizer = None

    # ---- model -----------------------------------------------------------------------------------------------
    def build_model(self, ctx):
        from evaclip_cli.checkpoints.init import init_from_recipe
        from evaclip_cli.models.clip import build_clip

        r = self.recipe
        model = build_clip(self.spec, zero_init=ctx.ds_config if ctx.zero_init else None, engine=True)
        zero3 = r.deepspeed.zero_stage == 3 and ctx.zero_init
        if zero3:
            from evaclip_cli.models.zero_init import reinit_zero3

            reinit_zero3(model, ctx.info.is_main)
        from evaclip_cli.models.clip import count_params

        ctx.print(f"model: {count_params(model):,} parameters ({'partitioned by zero.Init' if zero3 else 'full copy'}"
                  f" on each of {ctx.info.world_size} process(es))")
        init_from_recipe(model, r.init, separate_qkv=not self.spec.vision.qkv_fused, is_main=ctx.info.is_main,
                         zero3=zero3, log=ctx.print)
        if r.init.clip:
            init_clip(model, r.init.clip, separate_qkv=not self.spec.vision.qkv_fused, is_main=ctx.info.is_main,
                      zero3=zero3, log=ctx.print)
        lock = r.model.lock
        if lock.image or lock.text:
            from evaclip_cli.models.clip import lock_towers

            locked = lock_towers(model, lock)
            ctx.print(f"locked towers: {locked['frozen']:,} parameters frozen (no gradients, no optimizer state), "
                      f"{locked['trained']:,} trained")
        if r.model.vision.drop_path:
            from timm.layers import DropPath

            for i, blk in enumerate(model.visual.trunk.blocks):
                rate = r.model.vision.drop_path * i / max(1, len(model.visual.trunk.blocks) - 1)
                if rate > 0:
                    blk.drop_path1, blk.drop_path2 = DropPath(rate), DropPath(rate)
        if r.model.grad_checkpointing:
            model.set_grad_checkpointing(True)
        t = r.tokens.image
        if t.method in ("random", "grid", "block") and t.keep_ratio < 1.0:
            from evaclip_cli.models.tokens import install

            self.reducer = install(model.visual.trunk, t.method, t.keep_ratio)
        self._full_attn_mask = model.text.attn_mask
        n = r.text_tokens()
        if n < self.spec.text.context_length and model.text.attn_mask is not None:
            # open_clip slices the causal mask only with pad masks: give it the reduced length's mask
            model.text.attn_mask = self._full_attn_mask[:n, :n].clone()
        return model

    def towers(self, ctx):
        o = self.recipe.optimizer
        return {
            "vision": TowerCfg(o.lr, o.weight_decay, o.layer_decay, self.spec.vision.depth),
            "text": TowerCfg(o.text_lr if o.text_lr is not None else o.lr,
                             o.text_weight_decay if o.text_weight_decay is not None else o.weight_decay,
                             o.text_layer_decay, self.spec.text.layers),
        }

    def layer_id(self, name):
        return clip_layer_id(name, self.spec.vision.depth, self.spec.text.layers)

    # ---- data ------------------------------------------------------------------------------------------------
    def sources(self, ctx):
        r = self.recipe
        if r.data.demo:
            from evaclip_cli.recipes import Source

            root = ensure_demo(ctx.info.is_main, ctx.console)
            if not r.eval.datasets:
                self.eval_sets = [(f"demo-{d.name}", d) for d in sorted((root / "zeroshot").iterdir()) if d.is_dir()]
            return [Source(shards=shard_pattern(root / "train"))]
        if not r.data.train:
            raise UserError("the recipe has no data.train sources (and data.demo is false); add "
                            "data.train = [{ shards = \"path/{00000..00099}.tar\" }]")
        return [s for s in r.data.train if s.kind == "image"]

    def add_eval_set(self, d) -> None:
        """A recipe's [[eval.datasets]] entry, evaluated periodically: every task (a video set through its middle
        frame, the paper's protocol for image models; the video stage reads ``video.frames``). Checked here, before
        the model is built, not at the first eval hours later."""
        for what, p in (("eval set", d.path), ("images folder", d.images)):
            if p is not None and not Path(p).exists():
                raise UserError(f"{p}: {what} of eval.datasets '{d.name}' not found (fix the path in the recipe, or "
                                "remove the set)")
        if d.task == "retrieval":
            self.retrieval_sets.append((d.name, Path(d.path), Path(d.images) if d.images else None))
        else:
            {"zeroshot": self.eval_sets, "video": self.video_sets}[d.task].append((d.name, Path(d.path)))

    def make_loader(self, sources, **kw):
        """The loader over ``sources`` (the video stage swaps in its clip loader)."""
        from evaclip_cli.data.wds import build_train_loader

        return build_train_loader(sources, **kw)

    def build_loader(self, ctx, state):
        from evaclip_cli.data.text import make_tokenizer

        r = self.recipe
        sources = self.sources(ctx)
        for d in r.eval.datasets:
            self.add_eval_set(d)
        self.tokenizer = make_tokenizer(self.spec.text.context_length, r.tokens.text.method,
                                        r.tokens.text.length, seed=r.seed)
        self._data = self.make_loader(
            sources, image_size=self.spec.vision.image_size, micro_batch=r.data.micro_batch, workers=r.data.workers,
            tokenizer=self.tokenizer, seed=r.seed, rank=ctx.info.rank, world_size=ctx.info.world_size,
            resampled=r.data.resampled, shuffle_buffer=r.data.shuffle_buffer, scale=tuple(r.data.aug.scale),
            interpolation=r.data.aug.interpolation, hflip=r.data.aug.hflip, start_state=state,
            max_skipped=r.data.max_skipped_in_a_row)
        return self._data

    # ---- loss ------------------------------------------------------------------------------------------------
    def loss(self, ctx, batch, step):
        """The contrastive loss of one micro batch against the micro batches of all ranks
        (``data.contrastive_batch = "micro"``; the engine's global mode calls ``features`` and
        ``contrastive_loss`` itself)."""
        img, txt, scale, extra = self.features(ctx, batch, step, ctx.engine.micro_steps)
        return self.contrastive_loss(ctx, img, txt, scale), {"logit_scale": float(scale.detach()), **extra}

    def features(self, ctx, batch, step, micro: int):
        """(image embeddings paired with the captions, text embeddings, logit scale, extra metrics) of one micro
        batch through the engine's forward. ``micro`` (DeepSpeed's micro step of this batch) seeds CLIPA's token
        reducer, so a second forward of the same batch (the global contrastive batch) drops the same tokens."""

        self._dtype = torch_dtype(self.recipe.deepspeed.precision)
        if self.reducer is not None:
            self.reducer.reseed(hash((self.recipe.seed, step, ctx.info.rank, micro)))
        images = batch["image"].to(ctx.device, dtype=self._dtype, non_blocking=True)
        texts = batch["text"].to(ctx.device, non_blocking=True)
        img, txt, scale = ctx.engine(images, texts)  # the engine's forward: ZeRO hooks, precision
        scale = scale.float().clamp(max=100.0).reshape(())  # logit_scale clamped to ln(100)
        img, extra = self.pool(img.float(), batch)
        return img, txt.float(), scale, extra

    def contrastive_loss(self, ctx, img, txt, scale):
        """open_clip's ClipLoss of these rows against the same tensors of every rank (gathered with grad)."""
        if not hasattr(self, "_loss"):
            from open_clip.loss import ClipLoss

            self._loss = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
                                  rank=ctx.info.rank, world_size=ctx.info.world_size)
        return self._loss(img, txt, scale)

    def pool(self, img, batch):
        """Image embeddings -> the embeddings paired with the captions (identity here; the video stage averages
        each clip's frames), plus extra metrics."""
        return img, {}

    # ---- eval ------------------------------------------------------------------------------------------------
    def live_eval_sets(self) -> list:
        """The sets evaluated periodically (``eval.runner.LiveSet``): zero-shot, retrieval, and video sets read with
        ``video_frames()`` frames a clip."""
        from evaclip_cli.eval.runner import LiveSet

        return ([LiveSet(name, Path(path)) for name, path in self.eval_sets]
                + [LiveSet(name, Path(path), "retrieval", images=images) for name, path, images in self.retrieval_sets]
                + [LiveSet(name, Path(path), "video", self.video_frames()) for name, path in self.video_sets])

    def video_frames(self) -> int:
        """Frames read per clip of a video eval set: the middle frame (the video stage reads ``video.frames``)."""
        return 1

    def evaluate(self, ctx, step):
        """The zero-shot figures of the eval sets (top-1/top-5, retrieval recalls): ``evaclip eval``'s core (same
        preprocessing, prompts, classifier, skip-and-count rule) on the model being trained, with full-length text
        attention for the prompts and captions."""

        from evaclip_cli.eval.runner import evaluate_live

        sets = self.live_eval_sets()
        if not sets:
            return {}
        dtype = torch_dtype(self.recipe.deepspeed.precision)
        model = ctx.engine.module
        model.text.attn_mask = self._full_attn_mask  # full-length class prompts
        try:
            return evaluate_live(model, self.spec, sets, device=ctx.device, rank=ctx.info.rank,
                                 world=ctx.info.world_size, batch_size=self.recipe.eval.batch_size, dtype=dtype)
        finally:
            n = self.recipe.text_tokens()
            if n < self.spec.text.context_length:
                model.text.attn_mask = self._full_attn_mask[:n, :n].clone()

    def finish(self, ctx):
        """Export the final weights as an open_clip folder, streamed from the last checkpoint (the loop has dropped
        the engine; the token reducer's hooks are the last reference to the model)."""
        import gc

        from evaclip_cli.checkpoints.convert import run_convert
        from evaclip_cli.engine import dist

        self.reducer = None
        gc.collect()

        if ctx.info.is_main:
            run_convert(ctx.out_dir / "checkpoints", ctx.out_dir / "final", src_format="deepspeed",
                        recipe=str(ctx.out_dir / "evaclip_recipe.toml"), force=True, quiet=True)
            ctx.print(f"final model: {ctx.out_dir / 'final'} (open_clip folder)")
        dist.barrier()


def init_clip(model, src: str, separate_qkv: bool, is_main: bool, zero3: bool, log=print) -> None:
    """Every parameter of the CLIP (towers, projections, logit_scale) from a whole-CLIP checkpoint (a released name,
    an hf-hub: source, a `train` run folder, an open_clip folder, a DeepSpeed checkpoint folder, an EVA .pt). Works
    under ZeRO-3 like init.vision."""
    from evaclip_cli.checkpoints.init import _Shape, load_into, read_any

    state = read_any(src, separate_qkv) if is_main or not zero3 else {}
    if zero3:
        from evaclip_cli.engine.dist import all_gather_object

        meta = all_gather_object({k: tuple(v.shape) for k, v in state.items()} if is_main else None)[0]
        if not is_main:
            state = {k: _Shape(s) for k, s in meta.items()}
    if is_main and not any(k.startswith("text.") or k.startswith("transformer.") for k in state):
        raise UserError(f"{src}: a vision-only checkpoint; init.clip needs a whole CLIP (a `train` output); use "
                        "init.vision for a vision tower")
    res = load_into(model, state, "", [], str(src), is_main, zero3)
    missing = f", {len(res['missing'])} not in the checkpoint (kept at init, first: {res['missing'][0]})" \
        if res["missing"] else ""
    log(f"init clip from {src}: {res['loaded']} tensors loaded{missing}")


def prepare_recipe(recipe: Recipe) -> Recipe:
    """The model trains at the reduced resolution when CLIPA's resize reduction is on: make the recipe's model say
    so, so that checkpoints, exports and estimates describe the model that actually trained. A whole CLIP to start
    from (``init.clip``) that the recipe could not read without fetching it (a Hub source) sets the model here."""
    if recipe.init.clip and recipe.stage != "distill":
        from evaclip_cli.checkpoints.init import clip_source_spec
        from evaclip_cli.recipes import with_source_model

        recipe = with_source_model(recipe, clip_source_spec(recipe.init.clip))
    if recipe.tokens.image.method == "resize":
        size = recipe.tokens.image.image_size
        model = recipe.model.model_copy(update={"vision": recipe.model.vision.model_copy(update={"image_size": size})})
        recipe = recipe.model_copy(update={"model": model})
    return recipe


def run_train(recipe: Recipe, out_dir: Optional[Path] = None, resume: Optional[str] = None, quiet: bool = False,
              accept_changes: bool = False) -> dict:
    from evaclip_cli.engine import dist
    from evaclip_cli.engine.loop import run
    from evaclip_cli.estimate import telemetry_flops

    recipe = prepare_recipe(recipe)
    stage = ClipStage(recipe)
    result = run(recipe, stage, out_dir=out_dir, resume=resume, quiet=quiet, accept_changes=accept_changes,
                 flops=lambda world, device: telemetry_flops(recipe, world, device))
    if dist.is_multi():  # on success only: a rank that failed alone must not wait in a barrier
        dist.shutdown()
    return result


def summary_line(result: dict) -> str:
    accs = {k[:-len("/acc1")]: v for k, v in result.items() if k.endswith("/acc1")}
    parts = []
    for name, acc in accs.items():
        chance = result.get(f"{name}/chance")
        parts.append(f"{name} top-1 {acc * 100:.1f}%" + (f" (chance {chance * 100:.1f}%)" if chance else ""))
    key = "/image_retrieval_recall@1"
    for name, t2i in ((k[:-len(key)], v) for k, v in result.items() if k.endswith(key)):
        i2t = result.get(f"{name}/text_retrieval_recall@1", float("nan"))
        parts.append(f"{name} R@1 text→image {t2i * 100:.1f}%, image→text {i2t * 100:.1f}%")
    return "; ".join(parts) if parts else "no zero-shot eval set"

