"""The speed levers of `evaclip eval` change no number: the fast tokenizer gives open_clip's ids, the PIL-only
decode-ahead gives torchvision's tensors bit for bit, the decode-ahead pool gives the DataLoader's batches, and the
classifier built while workers decode is the same classifier."""
import functools
import io
import random

import pytest


# --------------------------------------------------------------------------------------------------- tokenizer
def _prompts_of_shipped_metadata():
    """Every shipped template with every class name of its set (what `evaclip eval` encodes), every class name of any
    set with a few templates of another, every template with a few class names of another."""
    from evaclip_cli.eval.prompts import DEFAULT_TEMPLATES, shipped_metadata

    meta = shipped_metadata()
    texts = []
    for key, names in meta["classnames"].items():
        for t in meta["templates"].get(key, DEFAULT_TEMPLATES):
            texts += [t.format(c=c) for c in names]
    all_names = sorted({c for names in meta["classnames"].values() for c in names})
    all_tpls = sorted({t for tpls in meta["templates"].values() for t in tpls} | set(DEFAULT_TEMPLATES))
    rng = random.Random(0)
    texts += [rng.choice(all_tpls).format(c=c) for c in all_names for _ in range(2)]
    texts += [t.format(c=rng.choice(all_names)) for t in all_tpls for _ in range(3)]
    return texts


def _prompts_of_demo():
    from evaclip_cli.data import demo

    texts = [t.format(c=c) for tpls, names in ((demo.ZS_TEMPLATES["shapes"], demo.SHAPES),
                                                (demo.ZS_TEMPLATES["colors"], list(demo.COLORS)))
             for t in tpls for c in names]
    texts += [t.format(c=c) for tpls in demo.ZS_VIDEO_TEMPLATES.values() for t in tpls
              for c in list(demo.MOTIONS.values()) + list(demo.COLORS)]
    rng = random.Random(1)
    for _ in range(500):  # the demo's training captions
        t = rng.choice(demo.TEMPLATES + demo.SHAPE_ONLY + demo.VIDEO_TEMPLATES + demo.MOTION_ONLY)
        texts.append(t.format(color=rng.choice(list(demo.COLORS)), shape=rng.choice(demo.SHAPES), size="small",
                              bg="striped", where="in the corner", motion=rng.choice(list(demo.MOTIONS.values()))))
    return texts


def _awkward_texts():
    """What the plain-ASCII shortcut must not get wrong, and what must take open_clip's own cleaning."""
    rng = random.Random(2)
    printable = [chr(c) for c in range(0x20, 0x7F)]
    no_amp = [c for c in printable if c != "&"]
    texts = ["".join(rng.choice(no_amp) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    texts += ["".join(rng.choice(printable) for _ in range(rng.randint(0, 60))) for _ in range(1000)]
    texts += [
        "", " ", "   a   photo  of a {c}.  ", "A PHOTO OF A DOG.", "a photo of a dog's toy.", "it's 3.14 o'clock",
        "fish &amp; chips", "fish & chips", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp;", "a <end_of_text> b",
        "<start_of_text>",
        "tab\tseparated", "new\nline", "carriage\r\nreturn", "nul\x00char", "bell\x07", "del\x7f", "esc\x1b[31mred",
        "café", "CAFÉ", "naïve façade", "Ångström", "smart ‘quotes’ and “doubles”", "ﬁligree ﬂour", "ＬＯＵＤ",
        "mojibake: â€œquotedâ€\x9d", "sÃ³", "emoji 🐕 dog", "中文 标签", "ß", "İstanbul", "\u00a0nbsp\u00a0",
        "\u2028line sep", "zero\u200bwidth", "x" * 300, " ".join(["word"] * 100), "1234567890" * 10,
    ]
    texts += ["".join(rng.choice(printable + ["é", "&", "\t", "ß", "\u00a0", "’"]) for _ in range(40))
              for _ in range(1000)]
    return texts


def _assert_same_ids(tok, fast, texts, context_length=None):
    for s in range(0, len(texts), 4096):
        part = texts[s:s + 4096]
        a = tok(part, context_length=context_length) if context_length else tok(part)
        b = fast(part, context_length=context_length) if context_length else fast(part)
        assert a.dtype == b.dtype and a.shape == b.shape
        if not bool((a == b).all()):
            bad = [t for t, x, y in zip(part, a, b) if not bool((x == y).all())]
            raise AssertionError(f"{len(bad)} texts differ, first: {bad[0]!r}")


def test_fast_tokenizer_gives_open_clips_ids_on_every_shipped_prompt():
    from open_clip.tokenizer import SimpleTokenizer

    from evaclip_cli.eval.tokenize import FastTokenizer, fast_tokenizer

    tok = SimpleTokenizer()  # open_clip's own (context 77)
    fast = fast_tokenizer(tok)
    assert isinstance(fast, FastTokenizer)
    texts = _prompts_of_shipped_metadata()
    assert len(texts) > 80_000
    _assert_same_ids(tok, fast, texts)
    _assert_same_ids(tok, fast, texts[:5000], context_length=8)  # truncation: cut, last id = end of text
    _assert_same_ids(tok, fast, _prompts_of_demo())
    _assert_same_ids(tok, fast, _prompts_of_demo(), context_length=32)  # the tiny models' context


def test_fast_tokenizer_on_awkward_texts_and_the_ascii_shortcut():
    from open_clip.tokenizer import SimpleTokenizer, _clean_lower

    from evaclip_cli.eval.tokenize import fast_tokenizer, plain_ascii

    texts = _awkward_texts()
    tok = SimpleTokenizer(context_length=77)
    _assert_same_ids(tok, fast_tokenizer(tok), texts)
    _assert_same_ids(tok, fast_tokenizer(tok), texts, context_length=16)
    shortcut = [t for t in texts if plain_ascii(t)]
    assert len(shortcut) > 3000 and not any(plain_ascii(t) for t in ("a & b", "tab\tx", "café", "del\x7f", "\x1b"))
    for t in shortcut:  # the cleaning the shortcut replaces, on its own
        assert " ".join(t.split()).lower() == _clean_lower(t), t


def test_fast_tokenizer_recognises_only_what_it_reproduces():
    import open_clip
    from open_clip import tokenizer as oct

    from evaclip_cli.eval.tokenize import FastTokenizer, fast_tokenizer
    from evaclip_cli.models.loaded import LoadedClip

    ctx32 = functools.partial(oct.tokenize, context_length=32)
    fast = fast_tokenizer(ctx32)
    assert isinstance(fast, FastTokenizer) and fast.context_length == 32
    _assert_same_ids(ctx32, fast, _prompts_of_demo())
    assert isinstance(fast_tokenizer(open_clip.get_tokenizer("ViT-B-16")), FastTokenizer)
    other = (lambda texts: oct.tokenize(texts), oct.SimpleTokenizer(clean="whitespace"),
             oct.SimpleTokenizer(reduction_mask="simple"), functools.partial(oct.tokenize, "x"))
    for t in other:
        assert fast_tokenizer(t) is t

    class Spec:  # what LoadedClip.live reads
        class text:
            context_length = 24

        class vision:
            image_size = 32

    assert isinstance(fast_tokenizer(LoadedClip.live(None, Spec).tokenize), FastTokenizer)


# ------------------------------------------------------------------------------------------------- decode path
def _jpeg(im, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _real_images():
    """(name, encoded bytes): scikit-learn's digits and the demo's renders as JPEG at several sizes, qualities,
    chroma subsamplings, progressive, greyscale and CMYK; PNGs in RGBA, palette and greyscale; degenerate sizes."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from evaclip_cli.data import demo

    d = load_digits()
    rng = np.random.default_rng(0)
    out = []
    sizes = [(500, 375), (375, 500), (224, 224), (225, 223), (64, 64), (63, 65), (33, 17), (17, 300), (1, 1),
             (2, 3), (801, 601)]
    for k, (w, h) in enumerate(sizes):
        digit = Image.fromarray((d.images[k] * 15).astype("uint8")).resize((w, h), Image.BILINEAR)
        noise = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray((np.asarray(digit)[..., None].astype(np.uint16) + noise).clip(0, 255).astype("uint8"))
        for q, sub, prog in ((90, 2, False), (75, 1, True), (95, 0, False)):
            try:
                out.append((f"digit {w}x{h} q{q} sub{sub} prog{prog}", _jpeg(im, quality=q, subsampling=sub,
                                                                              progressive=prog)))
            except OSError:
                pass  # PIL cannot write some tiny progressive images
        out.append((f"digit {w}x{h} grey", _jpeg(im.convert("L"), quality=85)))
        if k < 3:
            out.append((f"digit {w}x{h} cmyk", _jpeg(im.convert("CMYK"), quality=85)))
            for mode in ("RGBA", "P", "L"):
                buf = io.BytesIO()
                im.convert(mode).save(buf, format="PNG")
                out.append((f"digit {w}x{h} png {mode}", buf.getvalue()))
    r = random.Random(0)
    for size in (64, 96, 130):
        img, _, _ = demo.render(r, size)
        out.append((f"demo {size}", demo._jpeg(img)))
    return out


@pytest.mark.parametrize("size,interp", [(64, "bicubic"), (224, "bicubic"), (37, "bicubic"), (64, "bilinear")])
def test_crop_path_is_torchvisions_transform_bit_for_bit(size, interp):
    import torch
    from open_clip.transform import image_transform

    from evaclip_cli.data.benchmarks import check_crop, crop_of, decode_crop, decode_image, to_float

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    transform = image_transform(size, is_train=False, mean=mean, std=std, interpolation=interp)
    got = crop_of(transform)
    assert got is not None and got[0].size == size and check_crop(transform, *got)
    crop, mean, std = got
    images = _real_images()
    for draft in (None, size):  # the default decode and --fast-decode's draft decode
        for name, data in images:
            ref = transform(decode_image(data, draft))
            ours = to_float(decode_crop(data, crop, draft)[None].copy(), mean, std)[0]
            assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
            assert torch.equal(ours, ref), (name, draft, (ours - ref).abs().max())
        batch = [decode_crop(data, crop, draft) for _, data in images]  # a batch = its images one by one
        import numpy as np

        stacked = to_float(np.stack(batch), mean, std)
        for k, (_, data) in enumerate(images):
            assert torch.equal(stacked[k], transform(decode_image(data, draft)))


def test_exotic_transforms_fall_back():
    from open_clip.transform import image_transform

    from evaclip_cli.data.benchmarks import Crop, check_crop, crop_of

    for kw in ({"resize_mode": "longest"}, {"resize_mode": "squash"}):
        assert crop_of(image_transform(64, is_train=False, **kw)) is None
    assert crop_of(image_transform((64, 48), is_train=False)) is None
    assert crop_of(image_transform(64, is_train=True)) is None
    assert crop_of(lambda im: im) is None
    t = image_transform(64, is_train=False)
    crop, mean, std = crop_of(t)
    assert not check_crop(t, Crop(64, resample=2), mean, std)  # a wrong filter is caught before any result is used
    assert not check_crop(t, crop, mean, (0.5, 0.5, 0.5))


# ----------------------------------------------------------------------------------------------- decode-ahead
@pytest.fixture(scope="module")
def jpeg_set(tmp_path_factory):
    """An ImageFolder of real JPEGs of several sizes (5 classes), two of them corrupt, plus the same as shards."""
    root = tmp_path_factory.mktemp("speed") / "set"
    images = [data for name, data in _real_images() if "png" not in name]
    for k, data in enumerate(images * 2):
        d = root / f"c{k % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{k:03d}.jpg").write_bytes(data)
    (root / "c1" / "zzz_truncated.jpg").write_bytes(images[0][: len(images[0]) // 3])
    (root / "c3" / "zzz_garbage.jpg").write_bytes(b"not a jpeg at all")
    return root


def _image_set(root, transform, size, draft=None):
    from evaclip_cli.data.benchmarks import classification_set
    from evaclip_cli.eval.adapters import ImageSet

    return ImageSet(classification_set(str(root)), transform, size, draft)


def _collect(source):
    return [(list(i), None if x is None else x.clone(), list(b)) for i, x, b in source]


@pytest.mark.parametrize("world,batch,draft", [(1, 16, None), (3, 7, None), (2, 64, 64)])
def test_decode_ahead_batches_equal_the_dataloaders(jpeg_set, world, batch, draft):
    import torch
    from open_clip.transform import image_transform

    from evaclip_cli.eval.loops import Runtime, open_batches, rank_slice
    from evaclip_cli.models.loaded import LoadedClip

    t = image_transform(64, is_train=False)
    loaded = LoadedClip(model=None, tokenize=None, image_size=64, name="x")
    for rank in range(world):
        ref_set = _image_set(jpeg_set, t, 64, draft)
        ref = _collect(open_batches(ref_set, Runtime(loaded, "cpu", rank, world, batch, 0)))  # DataLoader
        fast_set = _image_set(jpeg_set, t, 64, draft)
        rt = Runtime(loaded, "cpu", rank, world, batch, 2)
        # started before the transform is known (as the runner does before loading the model), then confirmed
        fast_set.transform = None
        fast_set.start_decoding(rank_slice(len(fast_set), rank, world, batch)[0], batch, 2, 64)
        pool = fast_set.pool
        fast_set.set_transform(t, 64, draft)
        assert fast_set.pool is pool
        got = _collect(open_batches(fast_set, rt))
        assert fast_set.pool is pool  # the pool started early served the batches
        assert len(got) == len(ref)
        for (i1, x1, b1), (i2, x2, b2) in zip(got, ref):
            assert i1 == i2 and b1 == b2
            assert (x1 is None) == (x2 is None) and (x1 is None or torch.equal(x1, x2))
        assert sum(len(b) for _, _, b in got) == (2 if world == 1 else sum(len(b) for _, _, b in ref))
        fast_set.close()
        assert not pool.procs


def test_images_the_crop_path_does_not_cover_take_the_models_transform(jpeg_set, monkeypatch):
    """An image the PIL-only path declines (NeedsTransform: here every third one a worker sees) is transformed by
    the main process with the model's transform and put back in its place in the batch."""
    import torch
    from open_clip.transform import image_transform

    import evaclip_cli.data.benchmarks as B
    from evaclip_cli.eval.loops import Runtime, open_batches
    from evaclip_cli.models.loaded import LoadedClip

    real, calls = B.decode_crop, {"n": 0}

    def declines_some(data, crop, draft=None):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise B.NeedsTransform
        return real(data, crop, draft)

    monkeypatch.setattr(B, "decode_crop", declines_some)  # the workers are forked: they see it
    t = image_transform(64, is_train=False)
    loaded = LoadedClip(model=None, tokenize=None, image_size=64, name="x")
    ref = _collect(open_batches(_image_set(jpeg_set, t, 64), Runtime(loaded, "cpu", 0, 1, 9, 0)))
    s = _image_set(jpeg_set, t, 64)
    got = _collect(open_batches(s, Runtime(loaded, "cpu", 0, 1, 9, 2)))
    assert calls["n"] == 0  # only the workers called it
    assert [(i, b) for i, _, b in got] == [(i, b) for i, _, b in ref]
    assert all(torch.equal(x1, x2) for (_, x1, _), (_, x2, _) in zip(got, ref) if x1 is not None)


def test_decode_ahead_is_dropped_when_the_model_disagrees(jpeg_set):
    from open_clip.transform import image_transform

    from evaclip_cli.eval.loops import rank_slice

    s = _image_set(jpeg_set, None, 0)
    order = rank_slice(len(s), 0, 1, 8)[0]
    s.start_decoding(order, 8, 2, 64)
    procs = list(s.pool.procs)
    s.set_transform(image_transform(96, is_train=False), 96)  # the model is 96 px: the 64 px crops are useless
    assert s.pool is None and not any(p.is_alive() for p in procs)
    s.start_decoding(order, 8, 2, 64)
    s.set_transform(image_transform(64, is_train=False, resize_mode="squash"), 64)  # not open_clip's default
    assert s.pool is None
    assert s.decoded(order, 8, 2) is None  # -> DataLoader


def test_decode_workers_stop_with_their_parent(tmp_path, jpeg_set):
    """A main process killed mid-eval leaves no decode worker behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    code = f"""
import os, sys, time
sys.path.insert(0, {str(ROOT)!r})
from evaclip_cli.data.benchmarks import classification_set
from evaclip_cli.eval.adapters import ImageSet
s = ImageSet(classification_set({str(jpeg_set)!r}), None, 0)
s.start_decoding(list(range(len(s))), 1, 2, 64)  # 1-image batches: the queues fill, workers wait
print(" ".join(str(p.pid) for p in s.pool.procs), flush=True)
time.sleep(60)
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in p.stdout.readline().split()]
    assert len(pids) == 2
    time.sleep(1.0)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.time() + 15
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [q for q in pids if _alive(q)]
    assert not alive


def _alive(pid: int) -> bool:
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return os.path.exists(f"/proc/{pid}")


def test_classifier_built_while_images_decode_is_the_same(tiny_clip_folder, jpeg_set):
    """The runner builds the text classifier after opening the batches (workers decoding): the same W, bit for bit,
    and the same logits as building it first."""
    import torch

    from evaclip_cli.checkpoints.load import load_clip
    from evaclip_cli.eval.loops import Runtime, classify, open_batches
    from evaclip_cli.eval.prompts import classifier
    from evaclip_cli.eval.runtime import predicted_image_size

    loaded = load_clip(str(tiny_clip_folder))
    assert predicted_image_size(str(tiny_clip_folder)) == loaded.image_size
    names = [f"class {c}" for c in range(5)]
    tpls = ["a photo of a {c}.", "a {c}.", "itap of a {c}."]
    W0, _ = classifier(loaded, names, tpls, "cpu", 4)
    s = _image_set(jpeg_set, loaded.transform(), loaded.image_size)
    rt = Runtime(loaded, "cpu", 0, 1, 8, 2)
    source = open_batches(s, rt)
    assert s.pool is not None and all(p.is_alive() for p in s.pool.procs)
    W1, _ = classifier(loaded, names, tpls, "cpu", 4)
    assert torch.equal(W0, W1)
    r1 = classify(s, W1, rt, source=source)
    r0 = classify(_image_set(jpeg_set, loaded.transform(), loaded.image_size), W0, Runtime(loaded, "cpu", 0, 1, 8, 0))
    assert r0 == r1 and r1["skipped"] == 2


def test_console_eval_imports_only_what_it_needs_and_agrees_with_python_m(tiny_clip_folder, jpeg_set, tmp_path):
    """`evaclip eval zeroshot` (the console script: nothing heavy imported before the command runs) decodes ahead,
    imports no training machinery, no transformers and no wandb (timm imports it when installed), leaves both
    importable afterwards and the garbage collector on, and gives `python -m evaclip_cli.cli`'s numbers."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "EVACLIP_CACHE": str(tmp_path / "cache")}
    args = ["eval", "zeroshot", "-m", str(tiny_clip_folder), "-d", str(jpeg_set), "--batch-size", "8", "--workers",
            "2", "--no-cache"]
    code = ("import sys, evaclip_entry; evaclip_entry.COMMAND_LINE = True\n"
            "from evaclip_cli.cli import main\n"
            f"code = main({args + ['-o', str(tmp_path / 'a.json')]!r})\n"
            "heavy = ('deepspeed', 'transformers', 'wandb', 'matplotlib', 'tensorboard', 'evaclip_cli.engine.loop', "
            "'evaclip_cli.stages', 'evaclip_cli.recipes')\n"
            "print('IMPORTED', [m for m in heavy if m in sys.modules])\n"
            "import gc, wandb, transformers\n"
            "print('GC', gc.isenabled(), 'OPEN_CLIP' if 'open_clip' in sys.modules else '')\n"
            "sys.exit(code)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "IMPORTED []" in r.stdout and "GC True OPEN_CLIP" in r.stdout, r.stdout[-500:]
    r = subprocess.run([sys.executable, "-m", "evaclip_cli.cli", *args, "-o", str(tmp_path / "b.json")], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["metrics"] == b["metrics"] and a["samples"] == b["samples"] and a["skipped"] == b["skipped"] == 2
