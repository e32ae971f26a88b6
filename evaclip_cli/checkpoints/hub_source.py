"""Checkpoints on the Hugging Face Hub as sources: ``hf-hub:OWNER/NAME[/FILE][@REVISION]`` and the released names
(``EVA-CLIP-18B``, see ``models.specs.RELEASED``) -> a local file or folder in huggingface_hub's own cache.

* ``hf-hub:OWNER/NAME``: the whole repo, its layout detected from the file list: an open_clip folder
  (``open_clip_config.json``), BAAI's transformers remote-code layout (``config.json`` + weights or shards + index),
  a timm folder, or the repo's only checkpoint file. Only the files of that layout are fetched (BAAI's repos hold
  the 36.7 GB reference ``.pt`` beside the HF shards). A repo with several checkpoints and no folder layout asks
  for ``hf-hub:OWNER/NAME/FILE``.
* ``hf-hub:OWNER/NAME/FILE``: that one file (a shard index brings its shards, a BAAI weights file its config.json).
* ``@REVISION``: a branch, tag or commit (``hf-hub:BAAI/EVA-CLIP-8B@main``); the last ``@`` of the source starts it.
* ``open_clip:MODEL/TAG`` (or open_clip's own ``MODEL:TAG``): a pretrained tag of open_clip's registry
  (``open_clip.get_pretrained_cfg``), e.g. ``open_clip:EVA02-E-14-plus/laion2b_s9b_b144k``: the Hub repo and weights
  file the registry names, fetched like ``hf-hub:`` (its ``.safetensors`` twin first, as open_clip does).

Downloads go through ``huggingface_hub`` (``hf_hub_download`` / ``snapshot_download``): its cache
(``HF_HUB_CACHE``/``HF_HOME``), its resumable transfers and progress bars, ``HF_TOKEN``, ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` as huggingface_hub honours them; files already cached are not fetched again. Before downloading,
the sizes the Hub reports are checked against the cache disk's free space. Every failure is one line
(``UserError``): offline with an empty cache, a missing repo/revision/file, 401/403, a full disk. Nothing is
written outside the cache, so a failed download leaves no output half-written.

This module sits in ``checkpoints/`` (below ``hub/``) so that convert, eval, push and the training stages' init
all resolve sources the same way.
"""
from __future__ import annotations

import errno
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from evaclip_cli.checkpoints.io import format_size
from evaclip_cli.errors import UserError

PREFIX = "hf-hub:"
_REPO = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:/(?P<file>.+))?")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                   "merges.txt", "bpe_simple_vocab_16e6.txt.gz")
_HF_WEIGHTS = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)")


@dataclass
class HubRef:
    repo: str
    file: Optional[str]
    revision: Optional[str]

    def __str__(self) -> str:
        return PREFIX + self.repo + (f"/{self.file}" if self.file else "") + (f"@{self.revision}" if self.revision
                                                                              else "")


@dataclass
class Resolved:
    path: Path  # the file or folder in the cache
    arch: Optional[str]  # a released name's architecture (for resolve_arch), else None
    source: str  # what the user gave
    layout: str  # open_clip | config (BAAI HF / timm folder) | file


def is_hub_source(text: str) -> bool:
    from evaclip_cli.models.specs import RELEASED, parse_open_clip_tag

    return str(text).startswith(PREFIX) or str(text) in RELEASED or parse_open_clip_tag(str(text)) is not None


def open_clip_ref(model: str, tag: str) -> HubRef:
    """open_clip's pretrained registry -> the Hub repo and weights file it names (``ORG/NAME/`` with no file means
    open_clip's default, ``open_clip_pytorch_model.bin``). One line when open_clip does not know the tag."""
    from open_clip import pretrained as registry

    cfg = registry.get_pretrained_cfg(model, tag)
    if not cfg:
        tags = registry.list_pretrained_tags_by_model(model)
        if tags:
            raise UserError(f"open_clip has no pretrained tag '{tag}' for {model}; its tags: {', '.join(tags)}")
        import difflib

        close = difflib.get_close_matches(model, sorted({m for m, _ in registry.list_pretrained()}), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise UserError(f"open_clip has no pretrained weights for model '{model}'{hint}; "
                        "open_clip.list_pretrained() lists MODEL:TAG pairs")
    hub = str(cfg.get("hf_hub") or "")
    if not hub:
        raise UserError(f"open_clip serves {model}/{tag} from {cfg.get('url') or 'a URL'}, not from the Hugging Face "
                        f"Hub; download it and give the file (evaclip eval -m {model} --pretrained FILE)")
    parts = hub.split("/")  # 'ORG/NAME/' or 'ORG/NAME/FILE' (open_clip's download_pretrained splits it so)
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    return HubRef(repo, filename or "open_clip_pytorch_model.bin", None)


def open_clip_tag_cfg(text: str) -> dict:
    """open_clip's registry entry of an open_clip tag (mean, std, quick_gelu, hf_hub, ...); {} for anything else."""
    from evaclip_cli.models.specs import RELEASED, parse_open_clip_tag

    tag = parse_open_clip_tag(text) if not text.startswith(PREFIX) and text not in RELEASED else None
    if tag is None:
        return {}
    from open_clip import pretrained as registry

    return dict(registry.get_pretrained_cfg(*tag))


def _open_clip_weights(ref: HubRef) -> HubRef:
    """The file open_clip itself would load: the ``.safetensors`` twin of the registry's file when the repo has it."""
    assert ref.file is not None
    names = set(_repo_names(HubRef(ref.repo, None, ref.revision)))
    twins = ["open_clip_model.safetensors"] if ref.file == "open_clip_pytorch_model.bin" else \
        [ref.file.rsplit(".", 1)[0] + ".safetensors"] if ref.file.endswith((".bin", ".pth")) else []
    for name in (*twins, ref.file):
        if name in names:
            return HubRef(ref.repo, name, ref.revision)
    raise UserError(f"{ref.file} not found in {ref.repo} (the file open_clip's pretrained registry names); check "
                    "the repo on the Hub, or give hf-hub:OWNER/NAME/FILE")


def parse(text: str) -> HubRef:
    """``hf-hub:OWNER/NAME[/FILE][@REVISION]`` -> HubRef (one line on a malformed source)."""
    body = text[len(PREFIX):] if text.startswith(PREFIX) else text
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
        if not revision.strip():
            raise UserError(f"{text}: empty revision after '@' (hf-hub:OWNER/NAME[/FILE][@REVISION])")
    m = _REPO.fullmatch(body)
    if not m or ".." in m.group("repo") or (m.group("file") and (".." in m.group("file").split("/")
                                                                   or m.group("file").endswith("/"))):
        raise UserError(f"{text}: not a Hub source; write hf-hub:OWNER/NAME, hf-hub:OWNER/NAME/FILE, optionally "
                        "@REVISION (a branch, tag or commit)")
    return HubRef(m.group("repo"), m.group("file"), revision)


def _stderr(line: str) -> None:
    print(f"evaclip: {line}", file=sys.stderr)


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def _free_bytes(path: Path) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_disk(need: int, what: str) -> None:
    """Refuse, in one line, a download the cache's disk cannot hold (sizes as the Hub reports them)."""
    if need <= 0:
        return
    where = cache_dir()
    free = _free_bytes(where)
    if need > free:
        raise UserError(f"not enough disk space for {what}: {format_size(need)} to download into {where}, "
                        f"{format_size(free)} free; free some space or point HF_HUB_CACHE (or HF_HOME) at a larger "
                        "disk")


# ------------------------------------------------------------------------------------------------ errors
def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _status(exc: BaseException) -> Optional[int]:
    code = getattr(getattr(exc, "response", None), "status_code", None)
    return code if isinstance(code, int) else None


def hub_error(exc: BaseException, ref: HubRef, what: Optional[str] = None) -> UserError:
    """One line for a huggingface_hub failure while fetching ``what`` (a file name; None: the repo) of ``ref``."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = f"@{ref.revision}" if ref.revision else ""
    subject = f"{what} of {ref.repo}{rev}" if what else f"{PREFIX}{ref.repo}{rev}"
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, OSError) and getattr(e, "errno", None) == errno.ENOSPC:
            return UserError(f"the disk filled up while downloading {subject} into {cache_dir()} (the partial file is "
                             "kept and resumes next time); free some space or point HF_HUB_CACHE at a larger disk")
        if isinstance(e, OSError) and getattr(e, "errno", None) in (errno.EDQUOT, errno.EROFS, errno.EACCES,
                                                                     errno.EPERM):
            from evaclip_cli.atomic import cannot

            where = e.filename or cache_dir()
            return UserError(f"cannot write {where}: {cannot(e, where)}, while downloading {subject}; point "
                             "HF_HUB_CACHE (or HF_HOME) at a folder you can write")
    for e in chain:
        status = _status(e)
        if isinstance(e, GatedRepoError):
            if status == 403:
                return UserError(f"{ref.repo} is gated and the account of HF_TOKEN has no access yet (403): request "
                                 "access on the repo's Hub page and wait for it to be granted")
            return UserError(f"{ref.repo} is gated (HTTP {status}): accept its terms on the repo's Hub page, then set "
                             "HF_TOKEN to a token of that account (or run `hf auth login`)")
        if isinstance(e, RepositoryNotFoundError):
            return UserError(f"repository {ref.repo} not found on {constants.ENDPOINT} (HTTP {status}); check the "
                             "name, or, if it is private, set HF_TOKEN to a token that can read it")
        if isinstance(e, RevisionNotFoundError):
            return UserError(f"revision '{ref.revision}' not found in {ref.repo}; name a branch, tag or commit that "
                             "exists")
        if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
            return UserError(f"{what or 'the file'} not found in {ref.repo}{rev}; check the file name (the repo's "
                             "files are listed on its Hub page)")
        if isinstance(e, HfHubHTTPError) and status == 401:
            return UserError(f"the Hub rejected the token while reading {ref.repo} (401 Unauthorized); set HF_TOKEN to "
                             "a valid token, or unset it for a public repo")
        if isinstance(e, HfHubHTTPError) and status == 403:
            return UserError(f"no read access to {ref.repo} (403 Forbidden); use a token with read permission on it "
                             "(fine-grained tokens need it granted)")
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain) or constants.HF_HUB_OFFLINE:
        return UserError(f"HF_HUB_OFFLINE is set and {subject} is not in the cache ({cache_dir()}); run once online, "
                         "or unset HF_HUB_OFFLINE")
    for e in chain:
        status = _status(e)
        if isinstance(e, HfHubHTTPError) and status is not None:
            return UserError(f"the Hub answered HTTP {status} for {subject}; try again later")
    if any(isinstance(e, LocalEntryNotFoundError) for e in chain) or any(
            type(e).__name__ in ("ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "DryRunError")
            for e in chain):
        return UserError(f"cannot reach the Hub ({constants.ENDPOINT}) and {subject} is not in the cache "
                         f"({cache_dir()}); check the connection (or HF_ENDPOINT)")
    return UserError(f"fetching {subject} failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")


# ------------------------------------------------------------------------------------------------ layouts
def choose_files(names: list[str], source: str) -> tuple[str, list[str]]:
    """(layout, files to fetch) for a whole repo, from its file list."""
    top = {n for n in names if "/" not in n}
    toks = [n for n in TOKENIZER_FILES if n in top]
    if "open_clip_config.json" in top:
        weights = sorted(n for n in top if n.startswith("open_clip_model") and n.endswith(".safetensors"))
        index = "open_clip_model.safetensors.index.json"
        if "open_clip_model.safetensors" in top:
            weights = ["open_clip_model.safetensors"]
        elif index in top:
            weights = [index, *(n for n in weights if n != "open_clip_model.safetensors")]
        else:
            weights = [str(n) for n in ("open_clip_pytorch_model.bin", "open_clip_model.bin") if n in top][:1]
        if not weights:
            raise UserError(f"{source}: an open_clip repo without weights (open_clip_model.safetensors, its index, or "
                            "open_clip_pytorch_model.bin)")
        return "open_clip", ["open_clip_config.json", *weights, *toks]
    if "config.json" in top:
        for single, index in (("model.safetensors", "model.safetensors.index.json"),
                              ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            if index in top:
                return "config", ["config.json", index]  # shards: read from the index once it is here
            if single in top:
                extra = ["mim_extras.safetensors"] if "mim_extras.safetensors" in top else []
                return "config", ["config.json", single, *extra]
    weights = sorted(n for n in names if n.endswith(WEIGHT_SUFFIXES))
    if len(weights) == 1:
        return "file", weights
    if not weights:
        raise UserError(f"{source}: the repo holds no checkpoint (no open_clip_config.json, no config.json with "
                        f"weights, no {'/'.join(WEIGHT_SUFFIXES)} file)")
    shown = ", ".join(weights[:6]) + (" ..." if len(weights) > 6 else "")
    raise UserError(f"{source}: the repo holds several checkpoints ({shown}); name one: {source}/FILE")


def _shards_of(index: Path) -> list[str]:
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise UserError(f"{index}: not a weights index (no weight_map)") from None


def _quiet_tqdm():
    """A tqdm class with the bars off, for the dry runs (metadata only); the real download keeps huggingface_hub's
    bars."""
    from huggingface_hub.utils import tqdm

    class Quiet(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


# ------------------------------------------------------------------------------------------------ resolve
def resolve_source(text: str, log: Callable[[str], None] = _stderr) -> Resolved:
    """``hf-hub:...``, a released name or an open_clip tag -> the local path in huggingface_hub's cache (downloading
    what is missing)."""
    from evaclip_cli.models.specs import RELEASED, parse_open_clip_tag

    arch = None
    source = str(text)
    tag = parse_open_clip_tag(source) if not source.startswith(PREFIX) and source not in RELEASED else None
    if tag is not None:
        ref = _open_clip_weights(open_clip_ref(*tag))
        log(f"{source}: {ref} (open_clip's pretrained registry)")
        path, layout = _fetch_file(ref, log)
        return Resolved(path=path, arch=source, source=source, layout=layout)  # resolve_arch reads open_clip's config
    if source in RELEASED:
        rel = RELEASED[source]
        arch = source if rel.layout != "hf" else None  # an HF folder's config.json says the architecture itself
        log(f"{source}: {rel.source} ({rel.layout} layout, {rel.size}, {rel.params:,} parameters)")
        ref = parse(rel.source)
    else:
        ref = parse(source)
    if ref.file:
        path, layout = _fetch_file(ref, log)
    else:
        path, layout = _fetch_repo(ref, log)
    return Resolved(path=path, arch=arch, source=source, layout=layout)


def _download(fn, ref: HubRef, what: Optional[str] = None):
    try:
        return fn()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  (every huggingface_hub failure becomes one line)
        raise hub_error(e, ref, what) from None


def _fetch_file(ref: HubRef, log) -> tuple[Path, str]:
    import posixpath

    from huggingface_hub import hf_hub_download

    assert ref.file is not None
    name = ref.file
    folder = posixpath.dirname(name)
    if name.endswith(".index.json"):  # a sharded checkpoint: the index, its shards, and a BAAI config beside them
        index = Path(_download(lambda: hf_hub_download(ref.repo, name, revision=ref.revision), ref, name))
        shards = [posixpath.join(folder, s) for s in _shards_of(index)]
        config = _optional_config(ref, folder)
        _get_many(ref, shards, log, f"{len(shards)} shards")
        return (index.parent if config else index), "config" if config else "file"
    info = _download(lambda: hf_hub_download(ref.repo, name, revision=ref.revision, dry_run=True), ref, name)
    if info.will_download:
        check_disk(int(info.file_size or 0), f"{ref}")
        log(f"downloading {ref} ({format_size(info.file_size or 0)}) into {cache_dir()}")
    path = Path(_download(lambda: hf_hub_download(ref.repo, name, revision=ref.revision), ref, name))
    if _HF_WEIGHTS.fullmatch(posixpath.basename(name)):  # a weights file of BAAI's HF layout needs its config.json
        _optional_config(ref, folder)
    return path, "file"


def _optional_config(ref: HubRef, folder: str) -> Optional[Path]:
    """config.json beside a weights file, if the repo has one (a BAAI HF folder taken file by file)."""
    import posixpath

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(ref.repo, posixpath.join(folder, "config.json"), revision=ref.revision))
    except EntryNotFoundError as e:
        if isinstance(e, LocalEntryNotFoundError):
            raise hub_error(e, ref, "config.json") from None
        return None
    except Exception as e:  # noqa: BLE001
        raise hub_error(e, ref, "config.json") from None


def _get_many(ref: HubRef, files: list[str], log, what: str) -> Path:
    """Fetch ``files`` of the repo into one snapshot folder (disk checked first); returns the folder."""
    from huggingface_hub import snapshot_download

    try:
        infos = snapshot_download(ref.repo, revision=ref.revision, allow_patterns=files, dry_run=True,
                                  tqdm_class=_quiet_tqdm())
    except Exception:  # noqa: BLE001  (offline / unreachable: the real call serves the cache or says why not)
        return Path(_download(lambda: snapshot_download(ref.repo, revision=ref.revision, allow_patterns=files), ref))
    found = {i.filename for i in infos}
    missing = [f for f in files if f not in found]
    if missing:
        raise UserError(f"{', '.join(missing[:3])} not found in {ref.repo}" + (f"@{ref.revision}" if ref.revision
                                                                                else ""))
    need = sum(int(i.file_size or 0) for i in infos if i.will_download)
    if need:
        check_disk(need, f"{ref} ({what})")
        log(f"downloading {ref} ({what}, {format_size(need)}) into {cache_dir()}")
    return Path(_download(lambda: snapshot_download(ref.repo, revision=ref.revision, allow_patterns=files), ref))


def _repo_names(ref: HubRef) -> list[str]:
    """The repo's files as the Hub lists them, or, offline / unreachable, what the cache holds of it."""
    from huggingface_hub import snapshot_download

    try:
        infos = snapshot_download(ref.repo, revision=ref.revision, dry_run=True, tqdm_class=_quiet_tqdm())
        return [i.filename for i in infos]
    except Exception as e:  # noqa: BLE001  (offline or unreachable: what the cache holds)
        cached = _cached_names(ref)
        if cached is None:
            raise hub_error(e, ref) from None
        return cached


def _fetch_repo(ref: HubRef, log) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download

    names = _repo_names(ref)
    layout, files = choose_files(names, str(ref))
    if layout == "config" and files[1].endswith(".index.json"):
        index = _download(lambda: snapshot_download(ref.repo, revision=ref.revision, allow_patterns=files[:2]), ref,
                          files[1])
        files = [*files, *_shards_of(Path(index) / files[1])]
    folder = _get_many(ref, files, log, f"{_LAYOUT_NAMES[layout]}, {len(files)} files")
    if layout == "file":
        return folder / files[0], layout
    return folder, layout


_LAYOUT_NAMES = {"open_clip": "open_clip folder", "config": "model folder", "file": "checkpoint"}


def _cached_names(ref: HubRef) -> Optional[list[str]]:
    """Files of the cached snapshot of ``ref`` (offline / Hub unreachable), or None when nothing is cached."""
    storage = cache_dir() / ("models--" + ref.repo.replace("/", "--"))
    rev = ref.revision or "main"
    commit = rev if re.fullmatch(r"[0-9a-f]{40}", rev) else None
    if commit is None:
        try:
            commit = (storage / "refs" / rev).read_text().strip()
        except OSError:
            return None
    snap = storage / "snapshots" / commit
    if not snap.is_dir():
        return None
    return sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())


def resolve_path(text: str, log: Callable[[str], None] = _stderr) -> tuple[Path, Optional[str]]:
    """A local path as it is; a Hub source resolved. Returns (path, released arch or None)."""
    if Path(text).exists() or not is_hub_source(text):
        return Path(text), None
    got = resolve_source(text, log)
    return got.path, got.arch
