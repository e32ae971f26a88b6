"""Readers of the evaluation layouts users already have, as one indexed, map-style dataset.

Classification
  * ImageFolder: ``ROOT/<class>/*.jpg`` (or ``ROOT/test/<class>/*``), optional ``classnames.txt`` / ``templates.txt``;
  * CLIP_benchmark's ``wds/`` layout: ``ROOT/<split>/nshards.txt`` + ``0.tar ...`` (``.jpg|.png|.webp`` + ``.cls``),
    ``ROOT/classnames.txt``, ``ROOT/zeroshot_classification_templates.txt``;
  * any webdataset shards with a class field (``--class-key``, default ``cls``), class names given separately.
Retrieval
  * CLIP_benchmark's ``wds/`` retrieval layout (``dataset_type.txt`` = retrieval; ``.txt`` = captions, one per line);
  * Karpathy-split caption JSON (``dataset_flickr30k.json`` / ``dataset_coco.json``: ``images[].filename``,
    ``filepath``, ``split``, ``sentences[].raw``) and CLIP_benchmark's annotation JSON (``[{"image", "caption"}]``).

Every sample is located up front (a file path, or a tar member's byte offset), so DataLoader workers read and decode
samples independently, ranks take disjoint slices, and an unreadable image is skipped and counted, never the end of
the run.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from evaclip_cli.errors import UserError

IMG_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WDS_IMG_EXTS = ("webp", "png", "jpg", "jpeg")


@dataclass(frozen=True)
class TarMember:
    tar: str
    offset: int
    size: int


Locator = Union[Path, TarMember]


@dataclass
class EvalSet:
    """An indexed evaluation set: ``items[i]`` locates image i, ``targets[i]`` is its label (int) or captions."""
    name: str
    task: str  # "classification" | "retrieval"
    items: list
    targets: list
    classnames: Optional[list] = None
    templates: Optional[list] = None
    layout: str = ""
    notes: list = field(default_factory=list)
    missing: int = 0  # samples located but without an image/label part (counted as skipped)
    folder_names: Optional[list] = None  # ImageFolder: the class folders' names, the last resort for class names


def read_bytes(loc: Locator) -> bytes:
    if isinstance(loc, TarMember):
        with open(loc.tar, "rb") as f:
            f.seek(loc.offset)
            data = f.read(loc.size)
        if len(data) != loc.size:
            raise OSError(f"{loc.tar}: truncated member at byte {loc.offset}")
        return data
    return Path(loc).read_bytes()


def decode_image(data: bytes, draft: Optional[int] = None):
    """PIL RGB image. ``draft`` (a target size) lets the JPEG decoder scale down by 2/4/8 while decoding, keeping the
    image at least twice the target size — bit-identical results are not promised, so it is opt-in."""
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(data))
    if draft and im.format == "JPEG":
        im.draft("RGB", (2 * draft, 2 * draft))
    im.load()
    return im.convert("RGB")


class ImageDataset:
    """Map-style: ``(index, tensor)`` or ``(index, None)`` for an unreadable image (counted by the caller)."""

    def __init__(self, items: list, transform: Callable, draft: Optional[int] = None):
        self.items, self.transform, self.draft = items, transform, draft

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(decode_image(read_bytes(self.items[i]), self.draft))
        except Exception:  # corrupt / truncated / unsupported image: skipped and counted
            return i, None


# ------------------------------------------------------------------------------------- decode-ahead (eval/prefetch)
@dataclass(frozen=True)
class Crop:
    """open_clip's eval preprocessing up to the pixels (``image_transform(size, is_train=False)``, resize mode
    "shortest"): the shortest side resized to ``size`` with PIL's ``resample`` filter, then the centre
    ``size``×``size`` crop. ``crop_image`` does it with PIL alone (no torch: decode workers may start before torch is
    imported) and ``to_float`` does ``ToTensor`` + ``Normalize`` on a batch; together they give torchvision's tensor
    bit for bit (``check_crop`` verifies that against the model's transform before the results are used)."""
    size: int
    resample: int = 3  # PIL.Image.Resampling.BICUBIC, open_clip's default


class NeedsTransform(Exception):
    """An image the PIL-only path does not cover (never seen: the crop would need padding); the caller runs the
    model's own transform on it."""


def crop_image(im, crop: Crop):
    """uint8 [size, size, 3] array of an RGB PIL image, as torchvision's ``Resize(size)`` (int: shortest side, no
    max_size) then ``CenterCrop(size)`` then ``convert("RGB")`` produce it."""
    import numpy as np

    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = crop.size, int(crop.size * long / short)  # torchvision's _compute_resized_output_size
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_h, new_w) != (h, w):
        im = im.resize((new_w, new_h), crop.resample)
    if crop.size > new_w or crop.size > new_h:
        raise NeedsTransform
    top = int(round((new_h - crop.size) / 2.0))  # torchvision's center_crop
    left = int(round((new_w - crop.size) / 2.0))
    im = im.crop((left, top, left + crop.size, top + crop.size)).convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def decode_crop(data: bytes, crop: Crop, draft: Optional[int] = None):
    return crop_image(decode_image(data, draft), crop)


def to_float(u8, mean, std):
    """[B, S, S, 3] uint8 (numpy or torch) -> [B, 3, S, S] float: torchvision's ``ToTensor`` (permute, to the default
    float dtype, ``div(255)``) and ``Normalize`` (``sub_(mean).div_(std)``), the same elementwise operations on a
    batch instead of one image."""
    import torch

    x = torch.as_tensor(u8).permute(0, 3, 1, 2).contiguous()
    x = x.to(dtype=torch.get_default_dtype()).div(255)
    m = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return x.sub_(m).div_(s)


def crop_of(transform) -> Optional[tuple]:
    """``(Crop, mean, std)`` when ``transform`` is open_clip's eval transform of a square model (torchvision
    ``Compose([Resize(int), CenterCrop, MaybeConvertMode("RGB"), MaybeToTensor, Normalize])``), else None."""
    try:
        from open_clip.transform import MaybeConvertMode, MaybeToTensor
        from torchvision import transforms as T
        from torchvision.transforms.functional import pil_modes_mapping
    except ImportError:
        return None
    ts = getattr(transform, "transforms", None)
    if type(transform) is not T.Compose or not isinstance(ts, list) or len(ts) != 5:
        return None
    rs, cc, cm, tt, nm = ts
    if not (type(rs) is T.Resize and type(cc) is T.CenterCrop and type(cm) is MaybeConvertMode
            and type(tt) in (MaybeToTensor, T.ToTensor) and type(nm) is T.Normalize):
        return None
    size = rs.size[0] if isinstance(rs.size, (list, tuple)) and len(rs.size) == 1 else rs.size
    if not isinstance(size, int) or rs.max_size is not None or tuple(cc.size) != (size, size) or cm.mode != "RGB" \
            or nm.inplace or rs.interpolation not in pil_modes_mapping:
        return None
    return Crop(size, int(pil_modes_mapping[rs.interpolation])), tuple(nm.mean), tuple(nm.std)


def check_crop(transform, crop: Crop, mean, std) -> bool:
    """The PIL-only path equals ``transform`` bit for bit on synthetic images of awkward sizes (odd crops, both
    orientations, one already at size): a guard against another torchvision's rounding before any result is used."""
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    s = crop.size
    for w, h in ((2 * s + 3, s + 7), (s + 1, 3 * s + 2), (s, s), (s + 2, s)):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        try:
            ours = to_float(np.stack([crop_image(im, crop)]), mean, std)[0]
        except NeedsTransform:
            return False
        if not torch.equal(ours, transform(im)):
            return False
    return True


def collate(batch):
    import torch

    idx = [i for i, t in batch if t is not None]
    bad = [i for i, t in batch if t is None]
    images = torch.stack([t for _, t in batch if t is not None]) if idx else None
    return idx, images, bad


# ------------------------------------------------------------------------------------------------ listing helpers
def _tar_index(tar_path: Path) -> dict:
    """{key: {ext: TarMember}} of a tar file, in order; a damaged tar is indexed up to the damage."""
    out: dict = {}
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = m.name.rsplit("/", 1)[-1]
                if "." not in name or name.startswith("."):
                    continue
                key, ext = name.split(".", 1)
                key = m.name[: len(m.name) - len(name)] + key
                out.setdefault(key, {})[ext.lower()] = TarMember(str(tar_path), m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        out.setdefault("__errors__", []).append(f"{tar_path}: {e}")
    return out


def _read_text(loc) -> str:
    return read_bytes(loc).decode("utf-8", errors="replace")


def _lines(path: Path) -> list:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def is_wds_layout(root: Path, split: str = "test") -> bool:
    return (root / split / "nshards.txt").is_file()


def _wds_shards(root: Path, split: str) -> list[Path]:
    try:
        n = int((root / split / "nshards.txt").read_text().strip())
    except ValueError:
        raise UserError(f"{root / split / 'nshards.txt'}: not a number of shards") from None
    shards = [root / split / f"{i}.tar" for i in range(n)]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: shard listed by nshards.txt ({n}) not found")
    return shards


def _index_shards(shards: list) -> tuple[list, list]:
    samples, errors = [], []
    for s in shards:
        idx = _tar_index(Path(s))
        errors += idx.pop("__errors__", [])
        samples += list(idx.items())
    return samples, errors


def _image_part(parts: dict):
    for ext in WDS_IMG_EXTS + ("jpg", "bmp"):
        if ext in parts:
            return parts[ext]
    return None


# ------------------------------------------------------------------------------------------------ classification
def classification_set(root: str, split: str = "test", class_key: str = "cls") -> EvalSet:
    """Detect the layout of ``root`` and index it for zero-shot classification."""
    p = Path(root)
    if p.is_dir() and is_wds_layout(p, split):
        return _wds_classification(p, split, class_key)
    if p.is_dir():
        if (p / "dataset_type.txt").is_file() and not any(p.glob("*/nshards.txt")):
            raise UserError(f"{p}: no {split}/nshards.txt (a CLIP_benchmark wds/ folder needs one per split)")
        return image_folder_set(p)
    if ".tar" in str(root):
        from evaclip_cli.data.wds import expand_shards

        shards = expand_shards(str(root))
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise UserError(f"{missing[0]}: shard not found")
        return _shards_classification(p.stem, [Path(s) for s in shards], class_key, None, None, "webdataset")
    raise UserError(f"{root}: dataset not found (give an ImageFolder root, a CLIP_benchmark wds/ folder, or .tar "
                    "shards)")


def image_folder_set(root: Path) -> EvalSet:
    base = root / "test" if (root / "test").is_dir() else root
    class_dirs = sorted(d for d in base.iterdir() if d.is_dir())
    if not class_dirs:
        raise UserError(f"{base}: no class folders (expected {base}/<class>/*.jpg)")
    items, targets = [], []
    for label, d in enumerate(class_dirs):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMG_EXTS)
        if not files:
            raise UserError(f"{d}: empty class folder (no images); remove it or add images")
        items += files
        targets += [label] * len(files)
    classnames = None
    if (root / "classnames.txt").is_file():
        classnames = _lines(root / "classnames.txt")
        if len(classnames) != len(class_dirs):
            raise UserError(f"{root / 'classnames.txt'}: {len(classnames)} class names for {len(class_dirs)} class "
                            f"folders in {base}; one name per folder, in sorted folder order")
    templates = None
    for name in ("templates.txt", "zeroshot_classification_templates.txt"):
        if (root / name).is_file():
            templates = _lines(root / name)
    return EvalSet(root.name, "classification", items, targets, classnames, templates, "imagefolder",
                   folder_names=[d.name.replace("_", " ") for d in class_dirs])


def _wds_classification(root: Path, split: str, class_key: str) -> EvalSet:
    kind = (root / "dataset_type.txt").read_text().strip().lower() if (root / "dataset_type.txt").is_file() \
        else "classification"
    if kind == "retrieval":
        raise UserError(f"{root}: a retrieval dataset (dataset_type.txt); use `evaclip eval retrieval`")
    if kind not in ("classification", ""):
        raise UserError(f"{root}: dataset_type '{kind}' is not supported (classification, retrieval)")
    classnames = _lines(root / "classnames.txt") if (root / "classnames.txt").is_file() else None
    tpl = root / "zeroshot_classification_templates.txt"
    templates = _lines(tpl) if tpl.is_file() else None
    name = root.name if root.name not in ("", ".") else "wds"
    return _shards_classification(name, _wds_shards(root, split), class_key, classnames, templates,
                                  "clip_benchmark wds")


def _shards_classification(name, shards, class_key, classnames, templates, layout) -> EvalSet:
    samples, errors = _index_shards(shards)
    items, targets, missing = [], [], 0
    for key, parts in samples:
        img = _image_part(parts)
        lab = parts.get(class_key)
        if img is None or lab is None:
            missing += 1
            continue
        try:
            targets.append(int(_read_text(lab).strip()))
        except ValueError:
            missing += 1
            continue
        items.append(img)
    if not items:
        raise UserError(f"{shards[0]}: no samples with an image and a '.{class_key}' label"
                        + (f" ({errors[0]})" if errors else ""))
    return EvalSet(name, "classification", items, targets, classnames, templates, layout,
                   notes=errors, missing=missing)


# ----------------------------------------------------------------------------------------------------- retrieval
def retrieval_set(root: str, images: Optional[str] = None, split: str = "test") -> EvalSet:
    p = Path(root)
    if p.is_dir() and is_wds_layout(p, split):
        samples, errors = _index_shards(_wds_shards(p, split))
        items, targets, missing = [], [], 0
        for key, parts in samples:
            img, txt = _image_part(parts), parts.get("txt")
            if img is None or txt is None:
                missing += 1
                continue
            caps = [c for c in _read_text(txt).splitlines()]
            items.append(img)
            targets.append(caps)
        if not items:
            raise UserError(f"{p}: no samples with an image and a .txt caption")
        return EvalSet(p.name, "retrieval", items, targets, layout="clip_benchmark wds", notes=errors, missing=missing)
    if p.is_file() and p.suffix == ".json":
        return _caption_json(p, Path(images) if images else None, split)
    if p.is_dir():
        cands = sorted(p.glob("*.json"))
        if len(cands) == 1:
            return _caption_json(cands[0], Path(images) if images else None, split)
        raise UserError(f"{p}: not a retrieval set (expected a CLIP_benchmark wds/ folder with {split}/nshards.txt, "
                        "or a caption JSON file)")
    raise UserError(f"{root}: retrieval dataset not found")


def _caption_json(path: Path, images: Optional[Path], split: str) -> EvalSet:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None
    entries = []  # (relative image path, captions)
    if isinstance(data, dict) and "images" in data:  # Karpathy: dataset_flickr30k.json / dataset_coco.json
        for im in data["images"]:
            if im.get("split", split) != split:
                continue
            rel = Path(im.get("filepath", "")) / im["filename"]
            entries.append((rel, [s["raw"] if isinstance(s, dict) else str(s) for s in im.get("sentences", [])]))
        layout = "karpathy json"
    elif isinstance(data, list) and data and isinstance(data[0], dict) and "image" in data[0]:
        for entry in data:  # CLIP_benchmark's flickr/coco annotation files
            caps = entry.get("caption", entry.get("captions", []))
            entries.append((Path(entry["image"]), [caps] if isinstance(caps, str) else list(caps)))
        layout = "clip_benchmark json"
    else:
        raise UserError(f"{path}: unknown caption JSON (expected Karpathy's {{'images': [...]}} or "
                        "[{'image': ..., 'caption': [...]}])")
    if not entries:
        raise UserError(f"{path}: no images in split '{split}'")
    roots = [images] if images else [path.parent, path.parent / "images", path.parent / "Images"]
    base = next((r for r in roots if r is not None and (r / entries[0][0]).is_file()), None)
    if base is None:
        alt = next((r for r in roots if r is not None and (r / entries[0][0].name).is_file()), None)
        if alt is None:
            raise UserError(f"{path}: image {entries[0][0]} not found under {', '.join(map(str, roots))}; "
                            "pass --images DIR")
        entries = [(Path(rel.name), caps) for rel, caps in entries]
        base = alt
    items = [base / rel for rel, _ in entries]
    targets = [caps for _, caps in entries]
    return EvalSet(path.stem, "retrieval", items, targets, layout=layout)
