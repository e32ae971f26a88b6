"""Zero-shot eval sets in the ImageFolder layout: ``ROOT/test/<class>/*`` (or ``ROOT/<class>/*``), with optional
``classnames.txt`` (one name per line, in sorted folder order) and ``templates.txt`` (``{c}`` placeholders)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError

IMG_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_TEMPLATES = ["a photo of a {c}."]


class FolderDataset:
    def __init__(self, items: list[tuple[Path, int]], transform: Optional[Callable]):
        self.items, self.transform = items, transform
        self.skipped = 0
        self._good: Optional[list[int]] = None

    def __len__(self):
        return len(self.items)

    def load(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as im:
            im.load()
            img = im.convert("RGB")
        return (self.transform(img) if self.transform else img), label

    def __getitem__(self, i: int):
        """Unreadable images are replaced by the next readable one and counted in ``skipped``."""
        for k in range(len(self.items)):
            j = (i + k) % len(self.items)
            try:
                return self.load(j)
            except Exception:
                self.skipped += 1
        raise UserError("no readable image in the eval set")


def load_zeroshot_folder(root, transform: Optional[Callable] = None):
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: eval set folder not found")
    base = root / "test" if (root / "test").is_dir() else root
    class_dirs = sorted(d for d in base.iterdir() if d.is_dir())
    if not class_dirs:
        raise UserError(f"{base}: no class folders (expected {base}/<class>/*.jpg)")
    items = []
    for label, d in enumerate(class_dirs):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMG_EXTS)
        if not files:
            raise UserError(f"{d}: empty class folder (no images)")
        items += [(p, label) for p in files]
    names_file = root / "classnames.txt"
    if names_file.is_file():
        classnames = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
        if len(classnames) != len(class_dirs):
            raise UserError(f"{names_file}: {len(classnames)} class names for {len(class_dirs)} class folders in "
                            f"{base}; one name per folder, in sorted folder order")
    else:
        classnames = [d.name.replace("_", " ") for d in class_dirs]
    tpl_file = root / "templates.txt"
    templates = [ln.strip() for ln in tpl_file.read_text().splitlines() if ln.strip()] if tpl_file.is_file() \
        else list(DEFAULT_TEMPLATES)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise UserError(f"{tpl_file}: template without the {{c}} placeholder: {bad[0]!r}")
    return FolderDataset(items, transform), classnames, templates
