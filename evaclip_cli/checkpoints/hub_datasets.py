"""Benchmark sets on the Hugging Face Hub: CLIP_benchmark's webdataset exports (``clip-benchmark/wds_<name>``, the
``wds/`` layout ``data/benchmarks.py`` reads) as ``hf-hub:OWNER/NAME[@REVISION]`` dataset repos.

Only what an evaluation reads is fetched: the split's shards and ``nshards.txt`` (``test/`` by default) and the
top-level ``.txt`` files of the layout (``classnames.txt``, ``zeroshot_classification_templates.txt``,
``dataset_type.txt``), never the train split. Downloads go through huggingface_hub's cache like the models'
(``checkpoints/hub_source.py``): resumable, ``HF_HUB_OFFLINE``/``HF_ENDPOINT``/``HF_TOKEN`` honoured, files already
cached not fetched again, the free space checked against the sizes the Hub reports before anything is fetched, and
every failure one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from evaclip_cli.checkpoints.hub_source import (
    PREFIX,
    HubRef,
    _download,
    _quiet_tqdm,
    _stderr,
    cache_dir,
    check_disk,
    hub_error,
    parse,
)
from evaclip_cli.checkpoints.io import format_size
from evaclip_cli.errors import UserError

DEFAULT_OWNER = "clip-benchmark"  # CLIP_benchmark's exports: clip-benchmark/wds_<name>
DEFAULT_ROOT = PREFIX + DEFAULT_OWNER
#: the layout's top-level files (offline, the cache is asked for these and the split: a pattern like "*.txt" would
#: also match the train split's files, which were never fetched)
LAYOUT_FILES = ("classnames.txt", "zeroshot_classification_templates.txt", "dataset_type.txt")


@dataclass
class HubSet:
    """One benchmark repo, planned: the files to fetch (None: offline, whatever the cache holds) and the bytes of
    them not in the cache yet."""

    ref: HubRef
    split: str
    files: Optional[list[str]]
    need: int


def is_hub_dataset(text: object) -> bool:
    return str(text).startswith(PREFIX)


def parse_dataset(text: str) -> HubRef:
    """``hf-hub:OWNER/NAME[@REVISION]`` -> HubRef (one line for a file path in it)."""
    ref = parse(text)
    if ref.file:
        raise UserError(f"{text}: a benchmark set is a whole dataset repo; write hf-hub:OWNER/NAME (e.g. "
                        f"{DEFAULT_ROOT}/wds_cifar10)")
    return ref


def set_name(ref: HubRef) -> str:
    """The set's name from its repo: ``wds_cifar10`` -> ``cifar10``."""
    return ref.repo.split("/", 1)[1].removeprefix("wds_")


def split_files(names: list[str], split: str, where: str) -> list[str]:
    """What an evaluation of ``split`` reads of a repo's file list: the split's folder and the top-level .txt files."""
    shards = sorted(n for n in names if n.startswith(f"{split}/"))
    if f"{split}/nshards.txt" not in shards:
        raise UserError(f"{where}: no {split}/nshards.txt in the repo (not a CLIP_benchmark webdataset export, or no "
                        f"'{split}' split)")
    return sorted(n for n in names if "/" not in n and n.endswith(".txt")) + shards


def plan(ref: HubRef, split: str = "test") -> HubSet:
    """The repo's listing and sizes (a dry run: nothing downloaded). Offline or unreachable: the cache decides at
    fetch time."""
    from huggingface_hub import snapshot_download

    try:
        infos = snapshot_download(ref.repo, repo_type="dataset", revision=ref.revision, dry_run=True,
                                  tqdm_class=_quiet_tqdm())
    except Exception as e:  # noqa: BLE001  (every huggingface_hub failure becomes one line)
        err = hub_error(e, ref)
        if "not in the cache" in str(err):  # offline / unreachable: what the cache holds, if anything
            return HubSet(ref, split, None, 0)
        raise err from None
    files = split_files([i.filename for i in infos], split, str(ref))
    need = sum(int(i.file_size or 0) for i in infos if i.filename in files and i.will_download)
    return HubSet(ref, split, files, need)


def fetch(hs: HubSet, log: Callable[[str], None] = _stderr) -> Path:
    """Download what ``plan`` listed (resuming partial files) -> the set's folder in the cache."""
    from huggingface_hub import snapshot_download

    patterns = hs.files if hs.files is not None else [f"{hs.split}/*", *LAYOUT_FILES]
    if hs.need:
        log(f"downloading {hs.ref} ({len(hs.files or [])} files, {format_size(hs.need)}) into {cache_dir()}")
    folder = Path(_download(lambda: snapshot_download(hs.ref.repo, repo_type="dataset", revision=hs.ref.revision,
                                                      allow_patterns=patterns), hs.ref))
    if not (folder / hs.split / "nshards.txt").is_file():
        raise UserError(f"{hs.ref}: the cache ({cache_dir()}) holds no {hs.split}/ split of it; run once online, or "
                        "unset HF_HUB_OFFLINE")
    return folder


def fetch_dataset(text: str, split: str = "test", log: Callable[[str], None] = _stderr) -> Path:
    """``hf-hub:OWNER/NAME`` -> the set's folder in huggingface_hub's cache (disk checked, then fetched)."""
    hs = plan(parse_dataset(text), split)
    check_disk(hs.need, str(hs.ref))
    return fetch(hs, log)


# ------------------------------------------------------------------------------------------------ suites
def hub_repo(d: dict) -> Optional[str]:
    """The Hub repo name of a suite's dataset entry: its ``hub`` key (false: not on the Hub), else its first
    ``wds_*`` folder name, else ``wds_<name>``; video sets are not on the Hub unless ``hub`` says so."""
    if "hub" in d:
        return d["hub"] or None
    if d["task"] == "video":
        return None
    return next((c for c in d["dirs"] if c.startswith("wds_")), f"wds_{d['name']}")


def not_on_hub(d: dict) -> str:
    """One line: where a set that is not on the Hub comes from and where to put it."""
    source = d.get("source") or ("a video set: its clips come from their authors" if d["task"] == "video"
                                 else "not among CLIP_benchmark's Hub exports")
    return (f"{d['name']}: not on the Hub ({source}); put it in DIR/{d['dirs'][0]} and pass --root DIR; the suite goes "
            "on without it")


def plan_suite(datasets: list[dict], root: str, split: str = "test") -> tuple[dict[str, HubSet], dict[str, str]]:
    """({dataset name: planned set}, {dataset name: one line why it is left out}) for ``--root hf-hub:OWNER``; the
    free space is checked against every planned set's size before anything is fetched."""
    owner = root[len(PREFIX):].strip("/")
    if not owner or "/" in owner:
        raise UserError(f"--root {root}: name the Hub owner of the sets (e.g. {DEFAULT_ROOT})")
    plans: dict[str, HubSet] = {}
    left: dict[str, str] = {}
    for d in datasets:
        repo = hub_repo(d)
        if repo is None:
            left[d["name"]] = not_on_hub(d)
            continue
        try:
            plans[d["name"]] = plan(HubRef(f"{owner}/{repo}", None, None), split)
        except UserError as e:
            left[d["name"]] = f"{d['name']}: {e}"
    need = sum(p.need for p in plans.values())
    check_disk(need, f"{len(plans)} benchmark sets from {root}")
    return plans, left
