"""What the training stages share: the embedded demo dataset and shard lists of a folder."""
from __future__ import annotations

from pathlib import Path

from evaclip_cli.data.demo import demo_dir
from evaclip_cli.errors import UserError


def ensure_demo(is_main: bool, console=None) -> Path:
    """The embedded demo dataset, generated on the first run (rank 0) and reused afterwards."""
    from evaclip_cli.data.demo import make_demo
    from evaclip_cli.engine import dist

    root = demo_dir()
    if is_main:
        if console is not None and not (root / "demo.json").is_file():
            console.print(f"making the demo dataset in {root} (procedural, no download)")
        make_demo(root)
    dist.barrier()
    return root


def shard_pattern(folder: Path) -> str:
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise UserError(f"{folder}: no .tar shards")
    return "::".join(str(s) for s in shards)
