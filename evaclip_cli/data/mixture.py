"""The data mixture a recipe samples: each source's share of the training samples and its samples over the run.

How the loaders mix (``data/wds.py``, ``data/video.py``), which this module reports without reading a shard:

* image stage, ``data.resampled = true``: every unit (one shard read front to back) comes from a source drawn by
  weight, so a source's share of the *shards read* is its weight's share; of the *samples* too when its shards hold
  as many samples as the other sources' shards (img2dataset writes 10,000 per shard by default);
* image stage, ``data.resampled = false``: epochs over all shards, weights unused: a source's share is its share of
  the shards;
* video stage: sample by sample, each from a source drawn by weight (``video.image_weight`` / ``video.video_weight``
  multiply each source's weight by its kind, as ``stages.video`` does): the shares are exact.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from evaclip_cli.data.wds import expand_shards


@dataclass
class SourceShare:
    shards: str  # the recipe's pattern
    kind: str  # image | video
    weight: float  # as the loader uses it (the video stage's kind multiplier applied)
    share: float  # of the run's samples (see the module docstring for when it is exact)
    samples: Optional[int]  # over the run; None when data.samples is 0 (epochs)
    named: int  # shards the pattern names
    present: Optional[int]  # of those, files that exist here; None for URLs and pipes


@dataclass
class Mixture:
    mode: str  # "shards by weight" | "epochs over shards" | "samples by weight"
    run_samples: int
    sources: list[SourceShare]

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "run_samples": self.run_samples, "sources": [asdict(s) for s in self.sources]}


def _present(shards: list[str]) -> Optional[int]:
    local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
    return sum(Path(s).is_file() for s in local) if local else None


def _kind_multiplier(kind: str, image_weight: float, video_weight: float) -> float:
    return video_weight if kind == "video" else image_weight


def mixture(sources: Iterable[Any], run_samples: int, resampled: bool, video_stage: bool = False,
            image_weight: float = 1.0, video_weight: float = 1.0) -> Mixture:
    """The mixture of recipe ``Source`` entries (``shards``, ``weight``, ``kind``). A source whose weight ends at 0
    (the video stage's multiplier) is left out, as the loader leaves it out."""
    rows = []
    for src in sources:
        w = float(src.weight) * (_kind_multiplier(src.kind, image_weight, video_weight) if video_stage else 1.0)
        if w > 0:
            shards = expand_shards(src.shards)
            rows.append((src, w, shards))
    by_shards = not video_stage and not resampled
    totals = sum(len(s) for _, _, s in rows) if by_shards else sum(w for _, w, _ in rows)
    out = []
    for src, w, shards in rows:
        share = (len(shards) if by_shards else w) / totals if totals else 0.0
        out.append(SourceShare(shards=src.shards, kind=src.kind, weight=w, share=share,
                               samples=round(share * run_samples) if run_samples else None, named=len(shards),
                               present=_present(shards)))
    mode = "samples by weight" if video_stage else "epochs over shards" if by_shards else "shards by weight"
    return Mixture(mode=mode, run_samples=run_samples, sources=out)
