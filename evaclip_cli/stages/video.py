"""``evaclip finetune-video``: the video stage of EVA-CLIP-18B.

Training (``VideoStage``, the CLIP stage of ``stages/clip.py`` with video data): every frame of a clip goes through the
shared vision tower in one forward (a batch's clips and images are one tensor of frames), a clip's embedding is the
mean of its L2-normalised frame embeddings (renormalised, ``models.pooling``), and the contrastive loss pairs it with
its caption; images are one-frame clips, mixed in by weight (``video.image_weight`` / ``video.video_weight`` times
each source's ``weight``). The model, checkpoints and exports are the CLIP's: the run starts from a ``train`` output
(``init.clip``) and its ``final/`` is an open_clip folder like any other. ZeRO, resume, logs: the engine's.
Periodic eval: the image sets (forgetting shows there) and the video sets, through ``evaclip eval``'s core
(``eval.runner.evaluate_live``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from evaclip_cli.errors import UserError
from evaclip_cli.models.pooling import pool_frames
from evaclip_cli.stages.clip import ClipStage
from evaclip_cli.stages.common import ensure_demo, shard_pattern

if TYPE_CHECKING:
    from evaclip_cli.recipes import Recipe


# ------------------------------------------------------------------------------------------------------ training
class VideoStage(ClipStage):
    """ClipStage with clips: data from ``data/video.py``, temporal mean pooling in the loss, zero-shot video eval."""

    name = "video"

    def build_model(self, ctx):
        model = super().build_model(ctx)  # init.clip read there
        if not self.recipe.init.clip:
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

    def make_loader(self, sources, **kw):
        from evaclip_cli.data.video import build_video_loader

        return build_video_loader(sources, frames=self.recipe.video.frames, jitter=self.recipe.video.jitter, **kw)

    def pool(self, img, batch):
        """Temporal mean of each clip's frame embeddings (images are 1-frame clips)."""
        n_video = sum(1 for n in batch["nframes"] if n > 1)
        return pool_frames(img, batch["nframes"]), {"video_fraction": n_video / len(batch["nframes"])}

    def video_frames(self) -> int:
        """Video eval sets are read as the stage trains: ``video.frames`` segment centres per clip."""
        return self.recipe.video.frames


def run_finetune_video(recipe: Recipe, out_dir: Optional[Path] = None, resume: Optional[str] = None,
                       quiet: bool = False, accept_changes: bool = False) -> dict:
    from evaclip_cli.engine import dist
    from evaclip_cli.engine.loop import run
    from evaclip_cli.estimate import telemetry_flops
    from evaclip_cli.stages.clip import prepare_recipe

    recipe = prepare_recipe(recipe)
    result = run(recipe, VideoStage(recipe), out_dir=out_dir, resume=resume, quiet=quiet,
                 accept_changes=accept_changes, flops=lambda world, device: telemetry_flops(recipe, world, device))
    if dist.is_multi():
        dist.shutdown()
    return result


def summary_line(result: dict) -> str:
    from evaclip_cli.stages.clip import summary_line as clip_summary

    return clip_summary(result)
