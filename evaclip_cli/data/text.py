"""Tokenization with CLIPA-v2 text token reduction (open_clip's BPE tokenizer, shipped in its wheel).

* ``none``      the model's context length (77), as open_clip tokenizes
* ``truncate``  SOT + the first ``length - 2`` word tokens + EOT
* ``random``    SOT + a random, order-preserving subset of the word tokens + EOT
* ``block``     SOT + a random contiguous block of word tokens + EOT
* ``syntax``    CLIPA's best: keeps nouns first. It needs a part-of-speech tagger whose model is a separate
                download (nltk's averaged perceptron); evaclip runs without downloads, so it is refused with a
                clear message rather than silently replaced.

EOT stays the largest id in every row, so open_clip's argmax pooling finds it.
"""
from __future__ import annotations

from typing import Optional

from evaclip_cli.errors import UserError


def make_tokenizer(context_length: int, method: str = "none", length: Optional[int] = None, seed: int = 0):
    import numpy as np
    import torch
    from open_clip.tokenizer import SimpleTokenizer, tokenize

    if method == "syntax":
        raise UserError("tokens.text.method = 'syntax' needs a part-of-speech tagger model that is a separate "
                        "download (nltk data); use truncate, random or block")
    if method == "none" or not length or length >= context_length:
        def tok_full(texts, rng=None):
            return tokenize(list(texts), context_length=context_length)

        return tok_full
    if method not in ("truncate", "random", "block"):
        raise UserError(f"tokens.text.method '{method}' is not one of none, truncate, random, block, syntax")
    if length < 3:
        raise UserError(f"tokens.text.length {length} leaves no word token (SOT and EOT take two)")
    bpe = SimpleTokenizer()
    sot, eot = bpe.encoder["<start_of_text>"], bpe.encoder["<end_of_text>"]
    keep = length - 2
    default_rng = np.random.default_rng(seed)

    def tok(texts, rng=None):
        rng = rng if rng is not None else default_rng
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = bpe.encode(t)
            if len(ids) > keep:
                if method == "truncate":
                    ids = ids[:keep]
                elif method == "random":
                    idx = np.sort(rng.choice(len(ids), size=keep, replace=False))
                    ids = [ids[j] for j in idx]
                else:  # block
                    start = int(rng.integers(0, len(ids) - keep + 1))
                    ids = ids[start:start + keep]
            row = [sot, *ids, eot]
            out[i, :len(row)] = torch.tensor(row)
        return out

    return tok
