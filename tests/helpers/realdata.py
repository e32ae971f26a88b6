"""Real data nobody here wrote, as evaclip's users have it: scikit-learn's bundled handwritten digits written as
webdataset shards (img2dataset layout) with captions from the class names, and a held-out ImageFolder."""
import io
import random
import tarfile
from pathlib import Path

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTIONS = ["a photo of the number {c}.", "a handwritten {c}.", "the digit {c}.", "a scan of a handwritten {c}.",
            "{c}, written by hand."]


def _image(pixels, size):
    import numpy as np
    from PIL import Image

    arr = (255 - np.asarray(pixels, dtype=np.float32).reshape(8, 8) * (255 / 16)).clip(0, 255).astype("uint8")
    return Image.fromarray(arr, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")


def write_digits(root: Path, size: int = 64, test_fraction: float = 0.25, shard_size: int = 400) -> dict:
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = list(range(len(d.target)))
    random.Random(0).shuffle(idx)
    n_test = int(len(idx) * test_fraction)
    test, train = idx[:n_test], idx[n_test:]
    (root / "train").mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    for s in range(0, len(train), shard_size):
        with tarfile.open(root / "train" / f"{s // shard_size:05d}.tar", "w") as tar:
            for i in train[s:s + shard_size]:
                buf = io.BytesIO()
                _image(d.data[i], size).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()),
                                  ("txt", rng.choice(CAPTIONS).format(c=NAMES[d.target[i]]).encode())):
                    info = tarfile.TarInfo(f"d{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    zs = root / "zeroshot"
    for k, i in enumerate(test):
        folder = zs / "test" / f"{d.target[i]}_{NAMES[d.target[i]]}"
        folder.mkdir(parents=True, exist_ok=True)
        _image(d.data[i], size).save(folder / f"{k:04d}.png")
    (zs / "classnames.txt").write_text("".join(n + "\n" for n in NAMES))
    (zs / "templates.txt").write_text("a photo of the number {c}.\na handwritten {c}.\nthe digit {c}.\n")
    n_shards = (len(train) + shard_size - 1) // shard_size
    return {"train": str(root / "train" / f"{{00000..{n_shards - 1:05d}}}.tar"), "zeroshot": str(zs),
            "n_train": len(train), "n_test": len(test)}


def write_digits_benchmark(root: Path, size: int = 64, n: int = 600, shard_size: int = 250) -> dict:
    """The digits as CLIP_benchmark's ``wds/`` layout, both tasks, as `clip_benchmark_export_wds` writes them:
    classification (``.webp``... here ``.png`` + ``.cls``, classnames.txt, templates) and retrieval (``.png`` +
    ``.txt`` with several captions per image), plus the same images as an ImageFolder and a Karpathy caption JSON."""
    import json

    from sklearn.datasets import load_digits

    d = load_digits()
    idx = list(range(len(d.target)))
    random.Random(2).shuffle(idx)
    idx = idx[:n]
    rng = random.Random(3)
    cls_root, ret_root, folder = root / "wds_digits", root / "wds_digits_captions", root / "digits_folder"
    images_dir = root / "karpathy" / "images"
    for r in (cls_root / "test", ret_root / "test", images_dir):
        r.mkdir(parents=True, exist_ok=True)
    karpathy = {"images": [], "dataset": "digits"}
    n_shards = (len(idx) + shard_size - 1) // shard_size
    for s in range(n_shards):
        with tarfile.open(cls_root / "test" / f"{s}.tar", "w") as tc, \
                tarfile.open(ret_root / "test" / f"{s}.tar", "w") as tr:
            for k, i in enumerate(idx[s * shard_size:(s + 1) * shard_size], start=s * shard_size):
                buf = io.BytesIO()
                img = _image(d.data[i], size)
                img.save(buf, format="PNG")
                caps = rng.sample(CAPTIONS, 3)
                caps = [c.format(c=NAMES[d.target[i]]) for c in caps]
                key = f"s{k:06d}"
                for tar, ext, data in ((tc, "png", buf.getvalue()), (tc, "cls", str(int(d.target[i])).encode()),
                                       (tr, "png", buf.getvalue()), (tr, "txt", "\n".join(caps).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                cdir = folder / "test" / f"{d.target[i]}_{NAMES[d.target[i]]}"
                cdir.mkdir(parents=True, exist_ok=True)
                img.save(cdir / f"{key}.png")
                img.save(images_dir / f"{key}.png")
                karpathy["images"].append({"filename": f"{key}.png", "split": "test",
                                           "sentences": [{"raw": c} for c in caps]})
    for r in (cls_root, ret_root):
        (r / "test" / "nshards.txt").write_text(f"{n_shards}\n")
    (cls_root / "classnames.txt").write_text("".join(c + "\n" for c in NAMES))
    (cls_root / "zeroshot_classification_templates.txt").write_text(
        "a photo of the number {c}.\na handwritten {c}.\nthe digit {c}.\n")
    (ret_root / "dataset_type.txt").write_text("retrieval\n")
    (folder / "classnames.txt").write_text("".join(c + "\n" for c in NAMES))
    (folder / "templates.txt").write_text("a photo of the number {c}.\na handwritten {c}.\nthe digit {c}.\n")
    (root / "karpathy" / "dataset_digits.json").write_text(json.dumps(karpathy))
    return {"wds_cls": cls_root, "wds_ret": ret_root, "folder": folder,
            "karpathy": root / "karpathy" / "dataset_digits.json", "n": len(idx)}
