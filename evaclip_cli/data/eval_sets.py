"""Zero-shot eval sets in the ImageFolder layout: ``ROOT/test/<class>/*`` (or ``ROOT/<class>/*``), with optional
``classnames.txt`` (one name per line, in sorted folder order) and ``templates.txt`` (``{c}`` placeholders)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from evaclip_cli.errors import UserError

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
    """The ImageFolder listing of ``evaclip eval`` (data/benchmarks.py) as training's periodic eval reads it."""
    from evaclip_cli.data.benchmarks import image_folder_set

    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: eval set folder not found")
    es = image_folder_set(root)
    templates = es.templates or list(DEFAULT_TEMPLATES)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise UserError(f"{root}: template without the {{c}} placeholder: {bad[0]!r}")
    return FolderDataset(list(zip(es.items, es.targets)), transform), es.classnames, templates
