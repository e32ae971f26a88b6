"""Class names, prompt templates and the zero-shot classifier built from them (CLIP_benchmark's protocol).

Class embedding = mean of the L2-normalised template embeddings, renormalised; logits = 100 · img · W.
``resolve_prompts`` decides where names and templates come from (and checks them) for image and video sets alike;
``classifier`` builds W, cached on disk for ``evaclip eval`` (keyed by the model's weights, names and templates) and
never for training's periodic eval (the weights change between evals). Prompts are tokenized through
``tokenize.fast_tokenizer`` (open_clip's ids, less work).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from evaclip_cli.errors import UserError

METADATA_FILE = "eval_files/zeroshot_metadata.json"
DEFAULT_TEMPLATES = ["a photo of a {c}."]


def shipped_metadata() -> dict:
    import json
    from pathlib import Path

    return json.loads((Path(__file__).parent.parent / METADATA_FILE).read_text(encoding="utf-8"))


def metadata_key(name: str) -> str:
    """A dataset name as the shipped metadata spells it (``wds/imagenet-1k`` -> ``imagenet1k``)."""
    n = name.lower().replace("-", "_")
    for prefix in ("wds_", "wds/"):
        if n.startswith(prefix):
            n = n[len(prefix):]
    aliases = {"imagenet": "imagenet1k", "imagenet_1k": "imagenet1k", "imagenetv2": "imagenet1k",
               "imagenet_v2": "imagenet1k", "imagenet_sketch": "imagenet1k", "flowers102": "flowers",
               "oxford_pets": "pets", "stanford_cars": "cars", "fgvc_aircraft": "fgvc_aircraft",
               "rendered_sst2": "renderedsst2", "vtab_caltech101": "caltech101"}
    return aliases.get(n, n)


def _read_list(path, what: str) -> list:
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: {what} file not found")
    try:
        return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read the {what} file ({e})") from None


def resolve_prompts(evalset, dataset_key: Optional[str], classnames_file=None, templates_file=None):
    """Class names and templates of ``evalset`` (anything with ``name``, ``classnames``, ``templates`` and integer
    ``targets``). Class names: the file given > the dataset's own (``classnames.txt``) > the shipped list for its
    name (for an ImageFolder, when it has one name per class folder: an ImageNet copy's folders are WordNet ids) >
    the folder names. Templates: the file given > the dataset's own > the shipped ones > "a photo of a {c}.".
    Checked: the files exist, every label has a name, every template has the ``{c}`` placeholder."""
    meta = shipped_metadata()
    key = metadata_key(dataset_key or evalset.name)
    classnames = evalset.classnames
    folders = getattr(evalset, "folder_names", None)
    if classnames_file:
        classnames = _read_list(classnames_file, "class-names")
    elif classnames is None and key in meta["classnames"]:
        shipped = meta["classnames"][key]
        if folders is None or len(shipped) == len(folders):
            classnames = shipped
    if classnames is None:
        classnames = folders
    if classnames is None:
        raise UserError(f"{evalset.name}: no class names (the dataset has no classnames.txt and '{key}' is not a "
                        "known benchmark); pass --classnames FILE (one name per line, in label order)")
    targets = list(evalset.targets)
    n_labels = max(targets) + 1 if targets else 0
    if n_labels > len(classnames):
        raise UserError(f"{evalset.name}: labels go up to {n_labels - 1} but there are {len(classnames)} class names;"
                        " the class-name list does not match the dataset")
    templates = evalset.templates
    if templates_file:
        templates = _read_list(templates_file, "templates")
    elif templates is None:
        templates = meta["templates"].get(key, list(DEFAULT_TEMPLATES))
    if not templates:
        raise UserError(f"{evalset.name}: no prompt templates")
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise UserError(f"template without the {{c}} placeholder: {bad[0]!r}")
    return list(classnames), list(templates)


# ---------------------------------------------------------------------------------------------------- classifier
def zeroshot_classifier(encode_text: Callable, tokenizer: Callable, classnames: Sequence[str],
                        templates: Sequence[str], device, batch_size: int = 256):
    """[embed_dim, n_classes] matrix of class embeddings."""
    import torch
    import torch.nn.functional as F

    texts, owners = [], []
    for i, c in enumerate(classnames):
        for t in templates:
            texts.append(t.format(c=c) if "{c}" in t else t.format(c))
            owners.append(i)
    feats = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            tok = tokenizer(texts[s:s + batch_size]).to(device)
            feats.append(F.normalize(encode_text(tok).float(), dim=-1))
    feats = torch.cat(feats)
    owners_t = torch.tensor(owners, device=feats.device)
    W = torch.zeros(len(classnames), feats.shape[1], device=feats.device)
    W.index_add_(0, owners_t, feats)
    W = F.normalize(W / torch.bincount(owners_t, minlength=len(classnames)).unsqueeze(1), dim=-1)
    return W.t()


def text_encoder(model):
    """``model.encode_text``, cutting each batch's padding after its longest prompt when that provably changes
    nothing: a causal text tower (open_clip ``TextTransformer``, as every EVA-CLIP has) pooled at the EOT token with
    no class token or pad mask: the EOT output attends only to the tokens before it. Zero-shot prompts are ~10
    tokens of a 77-token context, so the text tower does a fraction of the work."""
    try:
        from open_clip.transformer import TextTransformer
    except ImportError:
        return model.encode_text
    text = getattr(model, "text", None)
    if not (isinstance(text, TextTransformer) and text.cls_emb is None and text.attn_mask is not None
            and text.pool_type in ("argmax", "eos") and not getattr(text, "use_pad_mask", False)):
        return model.encode_text
    pad = getattr(text, "pad_id", 0)

    def encode(tokens):
        n = max(1, int((tokens != pad).sum(1).max()))
        full = text.attn_mask
        text.attn_mask = full[:n, :n]
        try:
            return model.encode_text(tokens[:, :n].contiguous())
        finally:
            text.attn_mask = full

    return encode


def encode_texts(loaded, texts: Sequence[str], device, batch_size: int, autocast=None):
    """[len(texts), D] L2-normalised text embeddings (float32, on the CPU), in batches."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from evaclip_cli.eval.tokenize import fast_tokenizer

    encode, tokenize, out = text_encoder(loaded.model), fast_tokenizer(loaded.tokenize), []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            with (autocast or contextlib.nullcontext)():
                e = encode(tokenize(list(texts[s:s + batch_size])).to(device))
            out.append(F.normalize(e.float(), dim=-1).cpu())
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


def fingerprint(model_arg: str, extra: str = "") -> str:
    """Identifies a model's weights without reading them: resolved path, sizes and mtimes of its files."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256(extra.encode())
    p = Path(model_arg)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else ([p] if p.exists() else [])
    h.update(str(p.resolve() if p.exists() else model_arg).encode())
    for q in files:
        st = q.stat()
        h.update(f"{q.relative_to(p) if p.is_dir() else q.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def cache_dir():
    import os
    from pathlib import Path

    return Path(os.environ.get("EVACLIP_CACHE", Path.home() / ".cache" / "evaclip")) / "classifiers"


def classifier(loaded, classnames, templates, device, batch_size: int, autocast=None,
               cache_id: Optional[str] = None):
    """``(W, from_cache)``: the [embed, classes] zero-shot classifier (float32, on ``device``). With ``cache_id``
    (the model's ``fingerprint``) it is read from / written to the disk cache, keyed by (model, names, templates);
    without, it is always computed (training: the weights change)."""
    import contextlib
    import hashlib
    import os

    import torch

    path = None
    if cache_id is not None:
        key = hashlib.sha256(repr((cache_id, list(classnames), list(templates))).encode()).hexdigest()[:32]
        path = cache_dir() / f"{key}.pt"
        if path.is_file():
            try:
                W = torch.load(path, map_location="cpu", weights_only=True)
                if W.shape[1] == len(classnames):
                    return W.to(device), True
            except Exception:
                pass
    from evaclip_cli.eval.tokenize import fast_tokenizer

    with torch.no_grad(), (autocast or contextlib.nullcontext)():
        W = zeroshot_classifier(text_encoder(loaded.model), fast_tokenizer(loaded.tokenize), classnames, templates,
                                device, batch_size=batch_size)
    W = W.float()
    if path is not None and int(os.environ.get("RANK", "0")) == 0:
        from evaclip_cli.atomic import atomic_file

        try:
            with atomic_file(path) as tmp:
                torch.save(W.cpu(), tmp)
        except (OSError, UserError):
            pass  # a read-only home: no cache, same numbers
    return W, False
