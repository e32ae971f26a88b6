"""An exact, faster path through open_clip's ``SimpleTokenizer`` for prompts and captions.

open_clip tokenizes each text as: clean (``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapsed, lower
case), split with its regex, byte-encode and BPE each piece, look the pieces up. For 80 templates × 1,000 class names
that is 80,000 ``ftfy`` passes over texts that are almost always plain printable ASCII. ``FastTokenizer`` gives the
same ids with less work, and only where that is provable:

* cleaning: a text of printable ASCII (U+0020–U+007E) without ``&`` is returned unchanged by ``ftfy.fix_text``
  (its encoding fixer returns ASCII as is, every other fixer acts on characters outside that range, HTML
  unescaping needs ``&``; NFC leaves ASCII alone) and by ``html.unescape`` (needs ``&``), so its clean form is
  ``" ".join(text.split()).lower()``. Any other text goes through open_clip's own clean function.
* pieces: the regex is the tokenizer's own; the ids of a piece are a pure function of the piece (open_clip's byte
  encoding, ``bpe`` and vocabulary), computed by open_clip's code once and remembered.
* truncation and padding: as ``SimpleTokenizer.__call__`` (cut at the context length, last id = end of text).

``fast_tokenizer`` recognises a ``SimpleTokenizer`` (lower-case cleaning, no reduction mask) and
``functools.partial(open_clip.tokenizer.tokenize, context_length=N)``; anything else (HF and SigLIP tokenizers, other
cleaning modes) is returned unchanged. tests/test_eval_speed.py checks the ids on every shipped template × class name.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional


def plain_ascii(text: str) -> bool:
    """Printable ASCII without ``&``: texts that open_clip's cleaning only lower-cases and re-spaces."""
    return text.isascii() and text.isprintable() and "&" not in text


class FastTokenizer:
    """Same ids as ``tok(texts, context_length)`` for a ``SimpleTokenizer`` ``tok`` with ``clean="lower"``."""

    def __init__(self, tok: Any, context_length: Optional[int] = None):
        self.tok = tok
        self.context_length = context_length or tok.context_length
        self.pieces: dict = {}

    def encode(self, text: str) -> list:
        tok = self.tok
        clean = " ".join(text.split()).lower() if plain_ascii(text) else tok.clean_fn(text)
        ids: list = []
        pieces = self.pieces
        for piece in tok.pat.findall(clean):
            got = pieces.get(piece)
            if got is None:
                coded = "".join(tok.byte_encoder[b] for b in piece.encode("utf-8"))
                got = pieces[piece] = [tok.encoder[p] for p in tok.bpe(coded).split(" ")]
            ids.extend(got)
        return ids

    def __call__(self, texts, context_length: Optional[int] = None):
        import numpy as np
        import torch

        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        sot, eot = self.tok.sot_token_id, self.tok.eot_token_id
        out = np.zeros((len(texts), ctx), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [sot, *self.encode(text), eot]
            if len(ids) > ctx:
                ids = ids[:ctx]
                ids[-1] = eot
            out[i, :len(ids)] = ids
        return torch.from_numpy(out)


def fast_tokenizer(tokenize: Callable) -> Callable:
    """``tokenize`` as a ``FastTokenizer`` when it is open_clip's ``SimpleTokenizer`` (or ``tokenize`` with a context
    length) with lower-case cleaning and no reduction mask; otherwise ``tokenize`` itself."""
    if isinstance(tokenize, FastTokenizer):
        return tokenize
    try:
        from open_clip import tokenizer as oct
    except ImportError:
        return tokenize
    ctx = None
    tok: Any = tokenize
    if isinstance(tokenize, functools.partial):
        if tokenize.func is not oct.tokenize or tokenize.args or set(tokenize.keywords) - {"context_length"}:
            return tokenize
        tok = oct._tokenizer
        ctx = tokenize.keywords.get("context_length", oct.DEFAULT_CONTEXT_LENGTH)
    if type(tok) is not oct.SimpleTokenizer or tok.reduction_fn is not None or tok.clean_fn is not oct._clean_lower:
        return tokenize
    if not (ctx or tok.context_length):
        return tokenize
    return FastTokenizer(tok, ctx)
