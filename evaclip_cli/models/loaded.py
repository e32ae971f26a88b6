"""A CLIP ready for evaluation: the model with its tokenizer and preprocessing, whatever it was loaded from.

``checkpoints.load.load_clip`` builds one from any source evaclip reads; the training stages build one around the
model being trained (``LoadedClip.live``), so periodic eval and ``evaclip eval`` run the same code on the same
inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LoadedClip:
    model: Any
    tokenize: Callable
    image_size: int
    name: str
    spec: Any = None
    mean: tuple = OPENAI_MEAN
    std: tuple = OPENAI_STD
    source: str = ""
    extra: dict = field(default_factory=dict)

    def transform(self):
        """open_clip's eval preprocessing for this model (resize shortest side bicubic, center crop, normalise)."""
        from open_clip.transform import image_transform

        return image_transform(self.image_size, is_train=False, mean=self.mean, std=self.std)

    @classmethod
    def live(cls, model, spec, name: str = "training") -> "LoadedClip":
        """The model being trained (any ZeRO stage): tokenizer at the spec's full context length, CLIP's
        mean/std, the spec's image size."""
        import functools

        from open_clip.tokenizer import tokenize

        # a partial, not a lambda: eval.tokenize.fast_tokenizer recognises it (same ids, less work)
        return cls(model=model, tokenize=functools.partial(tokenize, context_length=spec.text.context_length),
                   image_size=spec.vision.image_size, name=name, spec=spec, source="live")
