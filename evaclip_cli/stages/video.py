"""``evaclip finetune-video`` and ``evaclip eval video``: the video stage of EVA-CLIP-18B.

Training (``VideoStage``, the CLIP stage of ``train.py`` with video data): every frame of a clip goes through the
shared vision tower in one forward (a batch's clips and images are one tensor of frames), a clip's embedding is the
mean of its L2-normalised frame embeddings (renormalised), and the contrastive loss pairs it with its caption; images
are one-frame clips, mixed in by weight (``video.image_weight`` / ``video.video_weight`` times each source's
``weight``). The model, checkpoints and exports are the CLIP's: the run starts from a ``train`` output
(``init.clip``) and its ``final/`` is an open_clip folder like any other. ZeRO, resume, logs: the engine's.

Eval: zero-shot video classification (CLIP_benchmark's protocol on clips: class embeddings from prompt templates,
clip embedding as above) with the paper's single middle frame (``frames=1``) or a T-frame mean, metrics ``acc1``,
``acc5``, ``mean_per_class_recall`` and ``mean_top1_top5`` (Kinetics' number); video-text retrieval (R@1/5/10)
on a ``path,caption`` manifest. Unreadable clips are skipped and counted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from evaclip_cli.errors import UserError
from evaclip_cli.stages.clip import ClipStage
from evaclip_cli.stages.common import ensure_demo, shard_pattern


# ------------------------------------------------------------------------------------------------------- pooling
def pool_frames(frame_emb, nframes):
    """[sum(nframes), D] frame embeddings -> [len(nframes), D]: the mean of each clip's L2-normalised frame
    embeddings, renormalised."""
    import torch
    import torch.nn.functional as F

    e = F.normalize(frame_emb, dim=-1)
    if all(n == 1 for n in nframes):
        return e
    owner = torch.repeat_interleave(torch.arange(len(nframes), device=e.device),
                                    torch.as_tensor(nframes, device=e.device))
    out = torch.zeros(len(nframes), e.shape[1], device=e.device, dtype=e.dtype).index_add(0, owner, e)
    return F.normalize(out, dim=-1)


def encode_clips(model, clips, dtype=None):
    """[B, T, 3, S, S] -> [B, D] normalised clip embeddings (one forward over B·T frames)."""
    b, t = clips.shape[:2]
    x = clips.reshape(b * t, *clips.shape[2:])
    if dtype is not None:
        x = x.to(dtype)
    return pool_frames(model.encode_image(x).float(), [t] * b)


# ------------------------------------------------------------------------------------------------------ training
class VideoStage(ClipStage):
    """ClipStage with clips: data from ``data/video.py``, temporal mean pooling in the loss, zero-shot video eval."""

    name = "video"

    def __init__(self, recipe):
        super().__init__(recipe)
        self.video_sets: list[tuple[str, Path]] = []

    def build_model(self, ctx):
        model = super().build_model(ctx)
        if self.recipe.init.clip:
            init_clip(model, self.recipe.init.clip, separate_qkv=not self.spec.vision.qkv_fused,
                      is_main=ctx.info.is_main, zero3=self.recipe.deepspeed.zero_stage == 3 and ctx.zero_init,
                      log=ctx.print)
        else:
            ctx.print("[yellow]note:[/yellow] init.clip is not set: the video stage starts from random weights "
                      "(set init.clip to a `train` run folder)")
        return model

    def sources(self, ctx):
        from evaclip_cli.recipes import Source

        r, v = self.recipe, self.recipe.video
        if r.data.demo:
            root = ensure_demo(ctx.info.is_main, ctx.console)
            if not (root / "video_train").is_dir():
                raise UserError(f"{root}: the demo data has no videos (made with n_videos=0); remake it with "
                                f"`evaclip data make-demo {root} --force`")
            if not r.eval.datasets:
                self.eval_sets = [(f"demo-{d.name}", d) for d in sorted((root / "zeroshot").iterdir()) if d.is_dir()]
                self.video_sets = [(f"demo-video-{d.name}", d)
                                   for d in sorted((root / "zeroshot_video").iterdir()) if d.is_dir()]
            srcs = [Source(shards=shard_pattern(root / "train"), weight=1.0, kind="image"),
                    Source(shards=shard_pattern(root / "video_train"), weight=1.0, kind="video")]
        else:
            if not r.data.train:
                raise UserError("the recipe has no data.train sources (and data.demo is false); add "
                                "data.train = [{ shards = \"videos/{00000..00099}.tar\", kind = \"video\" }] (or a "
                                "path,caption CSV manifest), and image shards with kind = \"image\"")
            srcs = list(r.data.train)
        out = []
        for s in srcs:
            w = s.weight * (v.video_weight if s.kind == "video" else v.image_weight)
            if w > 0:
                out.append(s.model_copy(update={"weight": w}))
        if not any(s.kind == "video" for s in out):
            raise UserError("the video stage has no video source: give data.train a source with kind = \"video\" "
                            "and video.video_weight > 0")
        return out

    def add_eval_set(self, d) -> None:
        if d.task == "video":
            self.video_sets.append((d.name, Path(d.path)))
        else:
            super().add_eval_set(d)

    def make_loader(self, sources, **kw):
        from evaclip_cli.data.video import build_video_loader

        return build_video_loader(sources, frames=self.recipe.video.frames, jitter=self.recipe.video.jitter, **kw)

    def pool(self, img, batch):
        """Temporal mean of each clip's frame embeddings (images are 1-frame clips)."""
        n_video = sum(1 for n in batch["nframes"] if n > 1)
        return pool_frames(img, batch["nframes"]), {"video_fraction": n_video / len(batch["nframes"])}

    def evaluate(self, ctx, step):
        out = super().evaluate(ctx, step)  # the image sets: forgetting shows here
        if not self.video_sets:
            return out
        model = ctx.engine.module
        model.text.attn_mask = self._full_attn_mask
        try:
            for name, path in self.video_sets:
                res = zeroshot_video_in_training(
                    model, path, self.spec, ctx.device, rank=ctx.info.rank, world_size=ctx.info.world_size,
                    frames=self.recipe.video.frames, batch_size=max(1, self.recipe.eval.batch_size //
                                                                    self.recipe.video.frames),
                    dtype=getattr(self, "_dtype", None))
                out[f"{name}/acc1"] = res["acc1"]
                out[f"{name}/acc5"] = res["acc5"]
                out[f"{name}/chance"] = res["chance"]
        finally:
            n = self.recipe.text_tokens()
            if n < self.spec.text.context_length:
                model.text.attn_mask = self._full_attn_mask[:n, :n].clone()
        return out


def init_clip(model, src: str, separate_qkv: bool, is_main: bool, zero3: bool, log=print) -> None:
    """Every parameter of the CLIP (towers, projections, logit_scale) from a whole-CLIP checkpoint (a `train` run
    folder, an open_clip folder, a DeepSpeed checkpoint folder, an EVA .pt). Works under ZeRO-3 like init.vision."""
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


def zeroshot_video_in_training(model, root, spec, device, rank: int = 0, world_size: int = 1, frames: int = 8,
                               batch_size: int = 32, dtype=None) -> dict:
    """Zero-shot accuracy of the model being trained on a video folder set. Every rank runs the same number of
    forwards (ZeRO-3 gathers parameters collectively): slices are padded with a repeat that is not counted."""
    import torch
    from open_clip.tokenizer import tokenize

    from evaclip_cli.data.video import load_video_classification
    from evaclip_cli.eval.core import accumulate, all_reduce_state, finalize, zeroshot_classifier

    ds, classnames, templates = load_video_classification(root, frames, spec.vision.image_size)
    ctx_len = spec.text.context_length
    with torch.no_grad():
        W = zeroshot_classifier(model.encode_text, lambda t: tokenize(t, context_length=ctx_len), classnames,
                                templates, device).to(device)
        n = len(ds)
        per_rank = -(-n // world_size)
        idx = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
        state, filler = None, None
        for s in range(-(-per_rank // batch_size)):
            chunk = idx[s * batch_size:(s + 1) * batch_size]
            items = [it for it in (ds[i] for i in chunk) if it is not None]
            counted = bool(items)
            if not items:
                filler = filler or next((it for it in (ds[i] for i in range(n)) if it is not None), None)
                if filler is None:
                    raise UserError(f"{root}: no readable video")
                items = [filler]
            clips = torch.stack([c for c, _, _ in items]).to(device)
            emb = encode_clips(model, clips, dtype)
            if counted:
                labels = torch.tensor([lab for _, lab, _ in items])
                state = accumulate(100.0 * emb @ W, labels, len(classnames), state)
        if state is None:
            state = accumulate(torch.zeros(0, len(classnames)), torch.zeros(0, dtype=torch.long), len(classnames))
        state = all_reduce_state(state)
    res = finalize(state)
    res["chance"] = 1.0 / len(classnames)
    return res


def run_finetune_video(recipe, out_dir: Optional[Path] = None, resume: Optional[str] = None,
                       quiet: bool = False) -> dict:
    from evaclip_cli.engine import dist
    from evaclip_cli.engine.loop import run
    from evaclip_cli.stages.clip import prepare_recipe

    recipe = prepare_recipe(recipe)
    result = run(recipe, VideoStage(recipe), out_dir=out_dir, resume=resume, quiet=quiet)
    if dist.is_multi():
        dist.shutdown()
    return result


# ---------------------------------------------------------------------------------------------------------- eval
def _collate(items):
    """Batches of (clip, label, index); unreadable clips (None) are dropped and counted."""
    import torch

    good = [it for it in items if it is not None]
    bad = len(items) - len(good)
    if not good:
        return None, None, [], bad
    return (torch.stack([c for c, _, _ in good]), [lab for _, lab, _ in good], [i for _, _, i in good], bad)


def _clip_loader(ds, rank: int, world: int, batch_size: int, workers: int):
    import torch

    n = len(ds)
    per = -(-n // world)
    sub = torch.utils.data.Subset(ds, list(range(rank * per, min(n, (rank + 1) * per))))
    return torch.utils.data.DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=_collate, persistent_workers=False,
                                       prefetch_factor=2 if workers else None)


def is_retrieval_manifest(path: Path) -> bool:
    if not path.is_file() or path.suffix.lower() != ".csv":
        return False
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        header = [h.strip().lower() for h in fh.readline().split(",")]
    return "caption" in header and "label" not in header


def run_eval_video(model: str, dataset: str, *, name: Optional[str] = None, task: str = "auto", frames: int = 1,
                   pretrained=None, eva_config=None, arch=None, classnames=None, templates=None,
                   batch_size: int = 32, workers: Optional[int] = None, precision: str = "auto", output=None,
                   quiet: bool = False, loaded=None) -> dict:
    """``evaclip eval video``: zero-shot classification of a folder/CSV set or retrieval on a manifest; returns
    the metrics JSON (CLIP_benchmark's layout, see the brief) and writes it to ``output``."""
    from evaclip_cli.eval.core import _autocast, _finish, _model_and_dist, _precision, _setup_dist, default_workers

    path = Path(dataset)
    if not path.exists():
        raise UserError(f"{dataset}: no such folder or CSV (a folder of <class>/*.mp4, a label CSV, or a "
                        "path,caption manifest for retrieval)")
    if frames < 1:
        raise UserError(f"--frames must be >= 1 (1: the middle frame, the paper's protocol), got {frames}")
    if task == "auto":
        task = "retrieval" if is_retrieval_manifest(path) else "classification"
    if loaded is None:
        loaded, rank, world, device = _model_and_dist(model, pretrained, eva_config, arch)
    else:
        rank, world, device = _setup_dist()
    precision = _precision(precision, device)
    ac = _autocast(device, precision)
    workers = default_workers() if workers is None else workers
    label = name or (path.stem if path.is_file() else path.name)
    if task == "retrieval":
        r = _video_retrieval(loaded, path, frames, device, batch_size, workers, ac, rank, world, quiet)
        out = {"dataset": label, "model": str(model), "task": "video_retrieval", "metrics": r["metrics"],
               "samples": r["samples"], "captions": r["captions"], "skipped": r["skipped"], "language": "en",
               "frames": frames}
        _finish(out, output, quiet, rank, f"zero-shot video retrieval ({_protocol(frames)})")
        return out
    r = _video_classification(loaded, path, frames, device, batch_size, workers, ac, rank, world, quiet,
                              classnames, templates)
    out = {"dataset": label, "model": str(model), "task": "video_classification", "metrics": r["metrics"],
           "samples": r["samples"], "skipped": r["skipped"], "language": "en", "frames": frames,
           "classes": r["classes"], "templates": r["templates"]}
    _finish(out, output, quiet, rank, f"zero-shot video classification ({_protocol(frames)})")
    return out


def _protocol(frames: int) -> str:
    return "middle frame" if frames == 1 else f"mean of {frames} frames"


def _video_classification(loaded, path, frames, device, batch_size, workers, ac, rank, world, quiet,
                          classnames_file, templates_file) -> dict:
    import torch

    from evaclip_cli.data.video import load_video_classification
    from evaclip_cli.eval.core import _Progress, _sum_across, accumulate, all_reduce_state, finalize, zeroshot_classifier

    ds, classnames, templates = load_video_classification(path, frames, loaded.image_size)
    if classnames_file:
        classnames = [ln.strip() for ln in Path(classnames_file).read_text().splitlines() if ln.strip()]
    if templates_file:
        templates = [ln.strip() for ln in Path(templates_file).read_text().splitlines() if ln.strip()]
    with torch.inference_mode(), ac():
        W = zeroshot_classifier(loaded.model.encode_text, loaded.tokenize, classnames, templates, device).float()
    state, skipped = None, 0
    with _Progress(len(ds), path.name, not quiet and rank == 0) as prog, torch.inference_mode():
        for clips, labels, idx, bad in _clip_loader(ds, rank, world, batch_size, workers):
            skipped += bad
            if clips is not None:
                with ac():
                    emb = encode_clips(loaded.model, clips.to(device))
                state = accumulate(100.0 * emb.float() @ W, torch.tensor(labels), len(classnames), state)
            prog(len(idx) + bad)
    if state is None:
        state = accumulate(torch.zeros(0, len(classnames)), torch.zeros(0, dtype=torch.long), len(classnames))
    state = all_reduce_state(state)
    skipped = int(_sum_across([skipped])[0]) + ds.missing
    res = finalize(state)
    if res["samples"] == 0:
        raise UserError(f"{path}: none of the {len(ds)} clips could be decoded")
    m = {"acc1": res["acc1"], "acc5": res["acc5"], "mean_per_class_recall": res["mean_per_class_recall"],
         "mean_top1_top5": (res["acc1"] + res["acc5"]) / 2}
    return {"metrics": m, "samples": res["samples"], "skipped": skipped, "classes": len(classnames),
            "templates": len(templates)}


def _video_retrieval(loaded, path, frames, device, batch_size, workers, ac, rank, world, quiet) -> dict:
    import torch
    import torch.nn.functional as F

    from evaclip_cli.data.video import load_video_retrieval
    from evaclip_cli.engine.dist import all_gather_object
    from evaclip_cli.eval.core import _Progress, retrieval_metrics

    ds, captions, owner = load_video_retrieval(path, frames, loaded.image_size)
    ids, embs, skipped = [], [], 0
    with _Progress(len(ds), path.name, not quiet and rank == 0) as prog, torch.inference_mode():
        for clips, _, idx, bad in _clip_loader(ds, rank, world, batch_size, workers):
            skipped += bad
            if clips is not None:
                with ac():
                    embs.append(encode_clips(loaded.model, clips.to(device)).float().cpu())
                ids += idx
            prog(len(idx) + bad)
    parts = all_gather_object((ids, torch.cat(embs) if embs else None, skipped))
    order, video_emb = [], []
    for i, e, _ in parts:
        if e is not None:
            order += i
            video_emb.append(e)
    skipped = sum(p[2] for p in parts)
    if not video_emb:
        raise UserError(f"{path}: none of the {len(ds)} videos could be decoded")
    video_emb = torch.cat(video_emb)
    perm = sorted(range(len(order)), key=order.__getitem__)
    video_emb, order = video_emb[perm], [order[i] for i in perm]
    pos = {v: p for p, v in enumerate(order)}
    texts = [(c, pos[o]) for c, o in zip(captions, owner) if o in pos]  # captions of skipped videos go with them
    text_emb = []
    with torch.inference_mode():
        for s in range(0, len(texts), 256):
            with ac():
                e = loaded.model.encode_text(loaded.tokenize([t for t, _ in texts[s:s + 256]]).to(device))
            text_emb.append(F.normalize(e.float(), dim=-1).cpu())
    metrics = retrieval_metrics(video_emb, torch.cat(text_emb), [o for _, o in texts])
    return {"metrics": metrics, "samples": len(order), "captions": len(texts), "skipped": skipped}


def summary_line(result: dict) -> str:
    from evaclip_cli.stages.clip import summary_line as clip_summary

    return clip_summary(result)
