"""Zero-shot evaluation core (CLIP_benchmark's protocol), shared by ``train``'s periodic eval and ``evaclip eval``.

Class embedding = mean of the L2-normalised template embeddings, renormalised; logits = 100 · img · W.
Metrics: top-1, top-5 and mean per-class recall, under CLIP_benchmark's names (``acc1``, ``acc5``,
``mean_per_class_recall``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from evaclip_cli.errors import UserError


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


def accumulate(logits, labels, n_classes: int, state: Optional[dict] = None) -> dict:
    """Running counts for top-1/top-5 and per-class recall."""
    import torch

    if state is None:
        state = {"n": 0, "top1": 0, "top5": 0, "per_class_hit": torch.zeros(n_classes, dtype=torch.float64),
                 "per_class_n": torch.zeros(n_classes, dtype=torch.float64)}
    k = min(5, n_classes)
    topk = logits.topk(k, dim=1).indices.cpu()
    labels = labels.cpu()
    hit1 = topk[:, 0] == labels
    hitk = (topk == labels.unsqueeze(1)).any(dim=1)
    state["n"] += len(labels)
    state["top1"] += int(hit1.sum())
    state["top5"] += int(hitk.sum())
    state["per_class_hit"].index_add_(0, labels, hit1.double())
    state["per_class_n"].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    return state


def finalize(state: dict) -> dict:
    n = max(state["n"], 1)
    seen = state["per_class_n"] > 0
    recall = (state["per_class_hit"][seen] / state["per_class_n"][seen]).mean().item() if seen.any() else 0.0
    return {"acc1": state["top1"] / n, "acc5": state["top5"] / n, "mean_per_class_recall": recall,
            "samples": state["n"]}


def all_reduce_state(state: dict) -> dict:
    """Sum the counts over ranks (each rank evaluated a disjoint slice)."""
    import torch
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return state
    dev = "cuda" if tdist.get_backend() == "nccl" else "cpu"
    flat = torch.cat([torch.tensor([state["n"], state["top1"], state["top5"]], dtype=torch.float64),
                      state["per_class_hit"], state["per_class_n"]]).to(dev)
    tdist.all_reduce(flat)
    flat = flat.cpu()
    c = len(state["per_class_hit"])
    return {"n": int(flat[0]), "top1": int(flat[1]), "top5": int(flat[2]), "per_class_hit": flat[3:3 + c],
            "per_class_n": flat[3 + c:]}


def eval_transform(image_size: int):
    """CLIP eval preprocessing: resize the short side (bicubic), center crop, CLIP mean/std."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
                      T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(),
                      T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


def zeroshot_on_folder(model, root, spec, device, rank: int = 0, world_size: int = 1, batch_size: int = 256,
                       dtype=None, workers: int = 0) -> dict:
    """Zero-shot classification of an ImageFolder-style eval set (``classnames.txt``, ``templates.txt``).

    Each rank encodes a disjoint, equally long slice (padded with repeats that are not counted), so ZeRO-3 ranks run
    the same number of forwards; counts are summed over ranks."""
    import torch
    from open_clip.tokenizer import tokenize

    from evaclip_cli.data.eval_sets import load_zeroshot_folder

    dataset, classnames, templates = load_zeroshot_folder(root, transform=eval_transform(spec.vision.image_size))
    ctx_len = spec.text.context_length

    def tok(texts):
        return tokenize(texts, context_length=ctx_len)

    with torch.no_grad():
        W = zeroshot_classifier(model.encode_text, tok, classnames, templates, device).to(device)
        n = len(dataset)
        per_rank = -(-n // world_size)
        idx = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
        steps = -(-per_rank // batch_size)
        state = None
        for s in range(steps):
            chunk = idx[s * batch_size:(s + 1) * batch_size]
            items = [dataset[i] for i in chunk] if chunk else [dataset[0]]
            images = torch.stack([im for im, _ in items]).to(device)
            if dtype is not None:
                images = images.to(dtype)
            labels = torch.tensor([lab for _, lab in items])
            feats = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)
            logits = 100.0 * feats @ W
            if chunk:
                state = accumulate(logits, labels, len(classnames), state)
        if state is None:
            state = accumulate(torch.zeros(0, len(classnames)), torch.zeros(0, dtype=torch.long), len(classnames))
        state = all_reduce_state(state)
    res = finalize(state)
    res["chance"] = 1.0 / len(classnames)
    res["classes"] = len(classnames)
    return res


# =================================================================================================== evaclip eval
# The commands' engine: CLIP_benchmark's protocol (same classifier, same logits, same metric definitions) with the
# work arranged for speed: one batched pass over all prompts, the classifier cached across runs, images decoded in
# DataLoader workers straight from their files / tar offsets, ranks on disjoint slices.

METADATA_FILE = "eval_files/zeroshot_metadata.json"


def shipped_metadata() -> dict:
    import json
    from pathlib import Path

    return json.loads((Path(__file__).parent.parent / METADATA_FILE).read_text(encoding="utf-8"))


def _metadata_key(name: str) -> str:
    n = name.lower().replace("-", "_")
    for prefix in ("wds_", "wds/"):
        if n.startswith(prefix):
            n = n[len(prefix):]
    aliases = {"imagenet": "imagenet1k", "imagenet_1k": "imagenet1k", "imagenetv2": "imagenet1k",
               "imagenet_v2": "imagenet1k", "imagenet_sketch": "imagenet1k", "flowers102": "flowers",
               "oxford_pets": "pets", "stanford_cars": "cars", "fgvc_aircraft": "fgvc_aircraft",
               "rendered_sst2": "renderedsst2", "vtab_caltech101": "caltech101"}
    return aliases.get(n, n)


def resolve_prompts(evalset, dataset_key: str | None, classnames_file=None, templates_file=None):
    """Class names and templates: the files given > the dataset's own > the shipped ones for its name > folder
    names / "a photo of a {c}."."""
    from pathlib import Path

    meta = shipped_metadata()
    key = _metadata_key(dataset_key or evalset.name)
    classnames = evalset.classnames
    if classnames_file:
        p = Path(classnames_file)
        if not p.is_file():
            raise UserError(f"{p}: class-names file not found")
        classnames = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    elif classnames is None and key in meta["classnames"]:
        classnames = meta["classnames"][key]
    if classnames is None:
        raise UserError(f"{evalset.name}: no class names (the dataset has no classnames.txt and '{key}' is not a "
                        "known benchmark); pass --classnames FILE (one name per line, in label order)")
    n_labels = max(evalset.targets) + 1 if evalset.targets else 0
    if n_labels > len(classnames):
        raise UserError(f"{evalset.name}: labels go up to {n_labels - 1} but there are {len(classnames)} class names;"
                        " the class-name list does not match the dataset")
    templates = evalset.templates
    if templates_file:
        p = Path(templates_file)
        if not p.is_file():
            raise UserError(f"{p}: templates file not found")
        templates = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    elif templates is None:
        templates = meta["templates"].get(key, ["a photo of a {c}."])
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise UserError(f"template without the {{c}} placeholder: {bad[0]!r}")
    return classnames, templates


def _setup_dist():
    """Data-parallel eval under torchrun (the same launcher as `train`); a bare process stays single."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as tdist

        if not tdist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            tdist.init_process_group(backend)
    device = "cpu"
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return rank, world, device


def _fingerprint(model_arg: str, extra: str = "") -> str:
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


def cached_classifier(loaded, model_id: str, classnames, templates, device, batch_size: int, cache: bool,
                      autocast=None):
    """The [embed, classes] zero-shot classifier; cached on disk by (model weights, class names, templates)."""
    import contextlib
    import hashlib
    import os

    import torch

    key = hashlib.sha256(repr((model_id, list(classnames), list(templates))).encode()).hexdigest()[:32]
    path = cache_dir() / f"{key}.pt"
    if cache and path.is_file():
        try:
            W = torch.load(path, map_location="cpu", weights_only=True)
            if W.shape[1] == len(classnames):
                return W.to(device), True
        except Exception:
            pass
    with torch.no_grad(), (autocast or contextlib.nullcontext)():
        W = zeroshot_classifier(text_encoder(loaded.model), loaded.tokenize, classnames, templates, device,
                                batch_size=batch_size)
    W = W.float()
    if cache and int(os.environ.get("RANK", "0")) == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(W.cpu(), tmp)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: no cache, same numbers
    return W, False


def _loader(evalset, loaded, rank, world, batch_size, workers, draft):
    import torch

    from evaclip_cli.data.benchmarks import ImageDataset, collate

    n = len(evalset.items)
    per = -(-n // world)
    idx = list(range(rank * per, min(n, (rank + 1) * per)))
    ds = torch.utils.data.Subset(ImageDataset(evalset.items, loaded.transform(), draft=draft), idx)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=collate, persistent_workers=False,
                                       prefetch_factor=4 if workers else None,
                                       pin_memory=torch.cuda.is_available())


def _autocast(device: str, precision: str):
    import contextlib
    import functools

    import torch

    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type=device.split(":")[0], dtype=dtype)


def default_workers() -> int:
    import os

    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def evaluate_classification(loaded, evalset, model_id: str, classnames, templates, device="cpu",
                            batch_size: int = 256, workers: int = 0, precision: str = "fp32", cache: bool = True,
                            draft=None, rank: int = 0, world: int = 1, progress=None) -> dict:
    import torch
    import torch.nn.functional as F

    ac = _autocast(device, precision)
    W, hit = cached_classifier(loaded, model_id, classnames, templates, device, batch_size, cache, ac)
    state, skipped = None, 0
    with torch.inference_mode():
        for idx, images, bad in _loader(evalset, loaded, rank, world, batch_size, workers, draft):
            skipped += len(bad)
            if images is None:
                continue
            with ac():
                feats = loaded.model.encode_image(images.to(device, non_blocking=True))
            logits = 100.0 * F.normalize(feats.float(), dim=-1) @ W
            labels = torch.tensor([evalset.targets[i] for i in idx])
            state = accumulate(logits, labels, len(classnames), state)
            if progress:
                progress(len(idx) + len(bad))
    if state is None:
        state = accumulate(torch.zeros(0, len(classnames)), torch.zeros(0, dtype=torch.long), len(classnames))
    state = all_reduce_state(state)
    skipped = int(_sum_across([skipped])[0]) + evalset.missing
    res = finalize(state)
    return {"metrics": {k: res[k] for k in ("acc1", "acc5", "mean_per_class_recall")}, "samples": res["samples"],
            "skipped": skipped, "classifier_cached": hit}


def _sum_across(values):
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return values
    from evaclip_cli.engine.dist import all_reduce_sum

    return all_reduce_sum(values)


def retrieval_metrics(image_emb, text_emb, text_owner, ks=(1, 5, 10)) -> dict:
    """CLIP_benchmark's definitions: image_retrieval_recall@k = share of captions whose image is in their top-k
    images; text_retrieval_recall@k = share of images with at least one of their captions in their top-k texts."""
    import torch

    scores = text_emb @ image_emb.t()  # [texts, images]
    owner = torch.as_tensor(text_owner)
    out = {}
    n_img = image_emb.shape[0]
    for k in ks:
        kk = min(k, n_img)
        top_img = scores.topk(kk, dim=1).indices  # per caption
        out[f"image_retrieval_recall@{k}"] = (top_img == owner.unsqueeze(1)).any(1).float().mean().item()
        kt = min(k, scores.shape[0])
        top_txt = scores.t().topk(kt, dim=1).indices  # per image: caption ids
        hit = (owner[top_txt] == torch.arange(n_img).unsqueeze(1)).any(1)
        out[f"text_retrieval_recall@{k}"] = hit.float().mean().item()
    return out


def evaluate_retrieval(loaded, evalset, device="cpu", batch_size: int = 256, workers: int = 0,
                       precision: str = "fp32", draft=None, rank: int = 0, world: int = 1, progress=None) -> dict:
    import torch
    import torch.nn.functional as F

    from evaclip_cli.engine.dist import all_gather_object

    ac = _autocast(device, precision)
    img_idx, img_emb, skipped = [], [], 0
    with torch.inference_mode():
        for idx, images, bad in _loader(evalset, loaded, rank, world, batch_size, workers, draft):
            skipped += len(bad)
            if images is not None:
                with ac():
                    img_emb.append(F.normalize(loaded.model.encode_image(images.to(device)).float(), dim=-1).cpu())
                img_idx += idx
            if progress:
                progress(len(idx) + len(bad))
    parts = all_gather_object((img_idx, torch.cat(img_emb) if img_emb else None, skipped))
    order, embs = [], []
    for ids, e, _ in parts:
        if e is not None:
            order += ids
            embs.append(e)
    skipped = sum(p[2] for p in parts) + evalset.missing
    if not embs:
        raise UserError(f"{evalset.name}: no readable image")
    image_emb = torch.cat(embs)
    perm = sorted(range(len(order)), key=order.__getitem__)
    image_emb, order = image_emb[perm], [order[i] for i in perm]
    texts, owner = [], []
    for pos, i in enumerate(order):  # captions of skipped images are dropped with them
        for c in evalset.targets[i]:
            texts.append(c)
            owner.append(pos)
    text_emb, encode_text = [], text_encoder(loaded.model)
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            with ac():
                e = encode_text(loaded.tokenize(texts[s:s + batch_size]).to(device))
            text_emb.append(F.normalize(e.float(), dim=-1).cpu())
    metrics = retrieval_metrics(image_emb, torch.cat(text_emb), owner)
    return {"metrics": metrics, "samples": len(order), "captions": len(texts), "skipped": skipped}


# ------------------------------------------------------------------------------------------------------ commands
def _write_json(path, obj) -> None:
    import json
    import os
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from evaclip_cli import atomic

    atomic.write_json(path, obj)


def print_results(rows: list, title: str) -> None:
    """A Rich table of metric dicts (fractions shown as percentages)."""
    from rich.console import Console
    from rich.table import Table

    cols: list = []
    for r in rows:
        for k in r["metrics"]:
            if k not in cols:
                cols.append(k)
    table = Table(title=title)
    table.add_column("dataset")
    for c in cols:
        table.add_column(c.replace("image_retrieval_recall", "t→i R").replace("text_retrieval_recall", "i→t R")
                         .replace("mean_per_class_recall", "mean/class").replace("mean_top1_top5", "mean(1,5)"),
                         justify="right")
    table.add_column("samples", justify="right")
    table.add_column("skipped", justify="right")
    for r in rows:
        table.add_row(r["dataset"], *[f"{100 * r['metrics'][c]:.2f}" if c in r["metrics"] else "" for c in cols],
                      f"{r['samples']:,}", str(r.get("skipped", 0)))
    Console().print(table)


class _Progress:
    def __init__(self, total: int, label: str, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self.p = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                              TimeRemainingColumn(), transient=True)
            self.t = self.p.add_task(label, total=total)

    def __enter__(self):
        if self.enabled:
            self.p.__enter__()
        return self

    def __call__(self, n):
        if self.enabled:
            self.p.advance(self.t, n)

    def __exit__(self, *a):
        if self.enabled:
            self.p.__exit__(*a)


def _model_and_dist(model, pretrained, eva_config, arch):
    rank, world, device = _setup_dist()
    from evaclip_cli.checkpoints.load import load_clip

    loaded = load_clip(model, device=device, eva_config=eva_config, pretrained=pretrained, arch=arch)
    return loaded, rank, world, device


def run_zeroshot(model: str, dataset: str, *, name=None, key=None, pretrained=None, eva_config=None, arch=None,
                 classnames=None, templates=None, split="test", class_key="cls", batch_size=256, workers=None,
                 precision="auto", cache=True, fast_decode=False, output=None, quiet=False, loaded=None) -> dict:
    from evaclip_cli.data.benchmarks import classification_set

    evalset = classification_set(dataset, split=split, class_key=class_key)
    names, tpls = resolve_prompts(evalset, key or name, classnames, templates)
    if loaded is None:
        loaded, rank, world, device = _model_and_dist(model, pretrained, eva_config, arch)
    else:
        rank, world, device = _setup_dist()
    precision = _precision(precision, device)
    model_id = _fingerprint(model, f"{pretrained}|{eva_config}|{arch}|{precision}")
    workers = default_workers() if workers is None else workers
    with _Progress(len(evalset.items), f"{name or evalset.name}", not quiet and rank == 0) as prog:
        r = evaluate_classification(loaded, evalset, model_id, names, tpls, device, batch_size, workers, precision,
                                    cache, loaded.image_size if fast_decode else None, rank, world, prog)
    out = {"dataset": name or evalset.name, "model": str(model), "task": "zeroshot_classification",
           "metrics": r["metrics"], "samples": r["samples"], "skipped": r["skipped"], "language": "en",
           "classes": len(names), "templates": len(tpls), "layout": evalset.layout}
    if pretrained:
        out["pretrained"] = str(pretrained)
    _finish(out, output, quiet, rank, "zero-shot classification")
    return out


def run_retrieval(model: str, dataset: str, *, name=None, images=None, pretrained=None, eva_config=None, arch=None,
                  split="test", batch_size=256, workers=None, precision="auto", fast_decode=False, output=None,
                  quiet=False, loaded=None) -> dict:
    from evaclip_cli.data.benchmarks import retrieval_set

    evalset = retrieval_set(dataset, images=images, split=split)
    if loaded is None:
        loaded, rank, world, device = _model_and_dist(model, pretrained, eva_config, arch)
    else:
        rank, world, device = _setup_dist()
    precision = _precision(precision, device)
    workers = default_workers() if workers is None else workers
    with _Progress(len(evalset.items), f"{name or evalset.name}", not quiet and rank == 0) as prog:
        r = evaluate_retrieval(loaded, evalset, device, batch_size, workers, precision,
                               loaded.image_size if fast_decode else None, rank, world, prog)
    out = {"dataset": name or evalset.name, "model": str(model), "task": "zeroshot_retrieval",
           "metrics": r["metrics"], "samples": r["samples"], "captions": r["captions"], "skipped": r["skipped"],
           "language": "en", "layout": evalset.layout}
    _finish(out, output, quiet, rank, "zero-shot retrieval")
    return out


def _precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return precision


def _finish(out: dict, output, quiet: bool, rank: int, title: str) -> None:
    if rank != 0:
        return
    if output:
        _write_json(output, out)
    if not quiet:
        print_results([out], f"{title}: {out['model']}")
        if out["skipped"]:
            from rich.console import Console

            Console(stderr=True).print(f"[yellow]{out['skipped']} unreadable or incomplete sample(s) skipped[/yellow]")


# --------------------------------------------------------------------------------------------------------- suites
SUITE_DIR = "eval_files/suites"


def suite_names() -> list:
    from pathlib import Path

    return sorted(p.stem for p in (Path(__file__).parent.parent / SUITE_DIR).glob("*.toml"))


def load_suite(name_or_path: str) -> dict:
    """A suite file: ``name``, ``[[datasets]]`` (name, task zeroshot|retrieval|video, dirs, key, metric, frames)
    and ``[[aggregates]]`` (name, and task or datasets: the mean of those datasets' metric; paper: the reported
    figure)."""
    import tomllib
    from pathlib import Path

    p = Path(name_or_path)
    if not p.is_file():
        p = Path(__file__).parent.parent / SUITE_DIR / f"{name_or_path}.toml"
    if not p.is_file():
        raise UserError(f"suite '{name_or_path}' not found: give a shipped suite ({', '.join(suite_names())}) or a "
                        ".toml file")
    try:
        s = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p}: invalid TOML ({e})") from None
    s.setdefault("name", p.stem)
    for i, d in enumerate(s.get("datasets", [])):
        if "name" not in d or d.get("task") not in ("zeroshot", "retrieval", "video"):
            raise UserError(f"{p}: datasets[{i}] needs a name and task = zeroshot | retrieval | video")
        d.setdefault("dirs", [d["name"]])
        d.setdefault("metric", {"zeroshot": "acc1", "retrieval": "mean_recall", "video": "acc1"}[d["task"]])
    if not s.get("datasets"):
        raise UserError(f"{p}: no [[datasets]]")
    return s


def _headline(result: dict, metric: str) -> float | None:
    m = result["metrics"]
    if metric == "mean_recall":
        vals = [v for k, v in m.items() if "_retrieval_recall@" in k]
        return sum(vals) / len(vals) if vals else None
    return m.get(metric)


def run_suite(model: str, suites: list, root, out_dir=None, *, pretrained=None, eva_config=None, arch=None,
              batch_size=256, workers=None, precision="auto", cache=True, fast_decode=False, frames=None,
              quiet=False) -> dict:
    from pathlib import Path

    from rich.console import Console

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: dataset root not found (--root DIR holding one folder per dataset)")
    specs = [load_suite(s) for s in suites]
    loaded, rank, world, device = _model_and_dist(model, pretrained, eva_config, arch)
    console = Console(quiet=quiet or rank != 0)
    results, missing, failed, per_suite = [], [], [], []
    for suite in specs:
        rows = []
        for d in suite["datasets"]:
            path = next((root / c for c in d["dirs"] if (root / c).exists()), None)
            if path is None:
                missing.append(d["name"])
                continue
            try:
                if d["task"] == "zeroshot":
                    r = run_zeroshot(model, str(path), name=d["name"], key=d.get("key"), loaded=loaded,
                                     batch_size=batch_size, workers=workers, precision=precision, cache=cache,
                                     fast_decode=fast_decode, quiet=True, pretrained=pretrained)
                elif d["task"] == "retrieval":
                    r = run_retrieval(model, str(path), name=d["name"], loaded=loaded, batch_size=batch_size,
                                      workers=workers, precision=precision, fast_decode=fast_decode, quiet=True)
                else:
                    from evaclip_cli.stages.video import run_eval_video

                    r = run_eval_video(model, str(path), name=d["name"], frames=frames or d.get("frames", 1),
                                       loaded=loaded,
                                       workers=workers, precision=precision, quiet=True)
            except UserError as e:
                failed.append(d["name"])
                console.print(f"[red]{d['name']}[/red]: {e}")
                continue
            r["headline"] = {"metric": d["metric"], "value": _headline(r, d["metric"])}
            console.print(f"{d['name']}: {d['metric']} {100 * (r['headline']['value'] or 0):.2f} "
                          f"({r['samples']:,} samples{', ' + str(r['skipped']) + ' skipped' if r['skipped'] else ''})")
            rows.append(r)
        per_suite.append((suite, rows))
        results += rows
    aggregates, paper = {}, {}
    for suite, rows in per_suite:
        for a in suite.get("aggregates", []):
            members = a.get("datasets") or [d["name"] for d in suite["datasets"] if d["task"] == a.get("task", d["task"])]
            vals = [r["headline"]["value"] for r in rows if r["dataset"] in members and r["headline"]["value"] is not None]
            if vals:
                label = a["name"] if len(vals) == len(members) else f"{a['name']} ({len(vals)} of {len(members)})"
                aggregates[label] = sum(vals) / len(vals)
                if "paper" in a:
                    paper[label] = a["paper"]
    out = {"model": str(model), "suite": "+".join(s["name"] for s in specs), "results": results, "missing": missing,
           "failed": failed, "aggregates": aggregates, "paper": paper}
    if rank == 0:
        out_dir = Path(out_dir) if out_dir else Path("eval") / Path(str(model)).name
        out_dir.mkdir(parents=True, exist_ok=True)
        from evaclip_cli.eval.report import results_markdown

        _write_json(out_dir / "results.json", out)
        md = out_dir / "results.md"
        md.write_text(results_markdown(out))
        png = _suite_chart(out, out_dir / "results.png")
        for task in dict.fromkeys(r["task"] for r in results):
            print_results([r for r in results if r["task"] == task], f"{task.replace('_', ' ')}: {out['model']}")
        for k, v in aggregates.items():
            ref = f" (paper, EVA-CLIP-18B: {100 * paper[k]:.1f})" if k in paper else ""
            console.print(f"[bold]{k}[/bold]: {100 * v:.2f}{ref}")
        if missing:
            console.print(f"[yellow]not found under {root}[/yellow]: {', '.join(missing)}")
        console.print(f"wrote {out_dir / 'results.json'}, {md}" + (f", {png}" if png else ""))
    return out


def _suite_chart(results: dict, path):
    """A horizontal bar chart of each dataset's headline metric."""
    rows = [r for r in results["results"] if r.get("headline", {}).get("value") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.2))
    names = [f"{r['dataset']} ({r['headline']['metric']})" for r in rows][::-1]
    vals = [100 * r["headline"]["value"] for r in rows][::-1]
    ax.barh(names, vals, color="#4C72B0")
    for y, v in enumerate(vals):
        ax.text(v + 0.5, y, f"{v:.1f}", va="center", fontsize=8)
    ax.set_xlim(0, 105)
    ax.set_xlabel("%")
    ax.set_title(f"{results['suite']}: {_short(results['model'])}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    import os

    os.replace(tmp, path)
    return path


def _short(p: str) -> str:
    from pathlib import Path

    return Path(p).name or p
