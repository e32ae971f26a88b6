"""``evaclip push``: an open_clip folder (or anything ``evaclip convert`` reads, converted on the way, Hub sources
``hf-hub:...`` and released names included) -> a Hugging Face Hub model repo, in one commit:
``open_clip_config.json``, safetensors weights (shards + index for large models), tokenizer files if any, and a
generated model card ``README.md``.

* The token comes from ``HF_TOKEN`` or the ``hf auth login`` store (huggingface_hub's ``get_token``); it is never
  printed, and any message that would carry it is scrubbed.
* Transient failures (HTTP 408/429/5xx, dropped or refused connections) are retried with exponential backoff;
  nothing is committed until every file is uploaded, so a failed push leaves the repo as it was.
* 401/403/404/409 end in one line that says what to do (``UserError``).
* ``--dry-run`` writes the exact folder that would be uploaded (weights hard-linked where possible) and lists it.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from evaclip_cli import __version__
from evaclip_cli.checkpoints.io import format_size
from evaclip_cli.errors import UserError
from evaclip_cli.hub.card import model_card
from evaclip_cli.hub.stage import stage

REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
RETRIES = 5  # attempts per Hub step


def _backoff_s() -> float:
    """First wait between retries (doubles each retry, max 30 s); EVACLIP_HUB_BACKOFF_S overrides the 1 s."""
    try:
        return max(0.0, float(os.environ.get("EVACLIP_HUB_BACKOFF_S", "1.0")))
    except ValueError:
        return 1.0





# ------------------------------------------------------------------------------------------------ the source








# ------------------------------------------------------------------------------------------------ model card
















# ------------------------------------------------------------------------------------------------ Hub errors
def _first_module(*names: str):
    """The first of ``names`` that imports, or None."""
    import importlib

    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _chain(exc: Optional[BaseException]):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _http_status(exc: BaseException) -> Optional[int]:
    for e in _chain(exc):
        resp = getattr(e, "response", None)
        code = getattr(resp, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def _server_message(exc: BaseException) -> str:
    for e in _chain(exc):
        msg = getattr(e, "server_message", None)
        if msg:
            return " ".join(str(msg).split())[:300]
    return ""


def _is_transient(exc: BaseException) -> bool:
    status = _http_status(exc)
    if status is not None:
        return status in TRANSIENT_STATUS
    httpx = _first_module("httpx2", "httpx")  # huggingface_hub < 2 used httpx / requests
    for e in _chain(exc):
        if httpx is not None and isinstance(e, httpx.TransportError):
            return True
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if type(e).__name__ in ("ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout", "ChunkedEncodingError"):
            return True
    return False


class _Scrub:
    """Removes the token from any text shown to the user."""

    def __init__(self, token: Optional[str]):
        self.token = token

    def __call__(self, text: str) -> str:
        return text.replace(self.token, "***") if self.token else text


def _user_error(exc: BaseException, repo_id: str, revision: Optional[str], what: str, scrub: _Scrub) -> UserError:
    status = _http_status(exc)
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    srv = scrub(_server_message(exc))
    detail = f": {srv}" if srv else ""
    if status == 401:
        msg = (f"the Hub rejected the token while {what} {where} (401 Unauthorized{detail}); set HF_TOKEN to a valid "
               "token with write access, or run `hf auth login`")
    elif status == 403:
        msg = (f"no write access to {where} (403 Forbidden{detail}); use a token with write permission on the "
               f"'{repo_id.split('/')[0]}' namespace (fine-grained tokens need it granted), or push to your own")
    elif status == 404:
        msg = (f"not found while {what} {where} (404{detail}); check --repo"
               + (" and --revision (a pull request targets an existing branch)" if revision else "")
               + ", and that the token can see the repo")
    elif status == 409:
        msg = (f"conflict while {what} {where} (409 Conflict{detail}); someone else may be writing to it: "
               "run the push again, or use --create-pr / another --revision")
    elif status is not None:
        msg = f"the Hub refused {what} {where} (HTTP {status}{detail})"
    else:
        msg = f"{what} {where} failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return UserError(scrub(msg))


def with_retries(fn: Callable, what: str, repo_id: str, revision: Optional[str], scrub: _Scrub,
                 log: Callable[[str], None], attempts: int = RETRIES, backoff_s: Optional[float] = None):
    """Run one Hub step; transient failures are retried with exponential backoff, the rest become one line."""
    delay = _backoff_s() if backoff_s is None else backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001  (classified below; nothing is swallowed)
            if not _is_transient(e):
                raise _user_error(e, repo_id, revision, what, scrub) from None
            status = _http_status(e)
            why = f"HTTP {status}" if status else type(e).__name__
            if attempt == attempts:
                raise UserError(scrub(f"the Hub kept failing while {what} {repo_id} ({why}, {attempts} attempts); "
                                      "nothing was committed, try again later")) from None
            log(f"{what} {repo_id}: {why}; retrying in {delay:g}s (attempt {attempt + 1}/{attempts})")
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


# ------------------------------------------------------------------------------------------------ the command
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _check_repo_id(repo_id: str) -> None:
    if not REPO_ID_RE.fullmatch(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise UserError(f"--repo '{repo_id}' is not a Hub repo id; use OWNER/NAME (letters, digits, '-', '_', '.')")


def run_push(src, repo_id: str, *, private: bool = False, revision: Optional[str] = None, create_pr: bool = False,
             commit_message: Optional[str] = None, results: Optional[Path] = None, dry_run: bool = False,
             out: Optional[Path] = None, force: bool = False, overwrite_card: bool = False, license: str = "mit",
             datasets: Iterable[str] = (), card: Optional[Path] = None, max_shard_size: Optional[str] = None,
             dtype: Optional[str] = None, eva_config=None, model=None, recipe=None,
             echo: Callable[[str], None] = print) -> dict:
    """Stage SRC, write the card, and upload everything in one commit (or, with ``dry_run``, write the folder)."""
    from evaclip_cli.atomic import AtomicDir, check_apart, check_output, output_lock
    from evaclip_cli.checkpoints.io import parse_size
    from evaclip_cli.eval.report import load_results

    def log(msg: str) -> None:
        print(f"evaclip: {msg}", file=sys.stderr)

    _check_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise UserError("--revision is empty; name a branch (or leave it out for main)")
    if max_shard_size is not None:
        parse_size(max_shard_size)
    results_data = load_results(results) if results else None
    card_text = None
    if card is not None:
        try:
            card_text = Path(card).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--card {card}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    token = None
    if not dry_run:
        from huggingface_hub import get_token

        token = get_token()
        if not token:
            raise UserError("no Hugging Face token: set HF_TOKEN to a token with write access, or run "
                            "`hf auth login`")
    lock = None
    if dry_run:
        out = Path(out) if out else Path(f"{repo_id.split('/', 1)[1]}-push")
        check_output(out, "any")  # before the staging (a conversion of tens of GB), not after
        if Path(str(src)).exists():
            check_apart(src, out, "stage")  # --force would replace the model being pushed
        lock = output_lock(out).acquire()  # two dry runs into one OUT: the second stops with one line
        if out.exists() and not force:
            raise UserError(f"{out} exists; pass --force to replace it (or --out DIR)")
    scrub = _Scrub(token)
    work = Path(tempfile.mkdtemp(prefix="evaclip-push-"))  # conversions land here: TMPDIR picks the disk
    try:
        from evaclip_cli.checkpoints.hub_source import resolve_path

        src, arch = resolve_path(str(src), log=log)  # hf-hub:OWNER/NAME[/FILE][@REV] or a released name
        if arch and not (eva_config or model or recipe):
            model = arch
        staged = stage(Path(src), work, max_shard_size=max_shard_size, dtype=dtype, eva_config=eva_config,
                       model=model, recipe=recipe)
        readme = work / "README.md"
        readme.write_text(card_text if card_text is not None else
                          model_card(repo_id, staged, license=license, datasets=datasets, results=results_data))
        files = {**staged.files, "README.md": readme}
        if dry_run:
            assert out is not None  # set with the lock above
            with AtomicDir(out, force) as tmp:
                for name, path in files.items():
                    _link_or_copy(path, tmp / name)
            listing = [(name, (out / name).stat().st_size, _sha256(out / name)) for name in sorted(files)]
            echo(f"dry run: nothing uploaded; {repo_id} would get these {len(listing)} files in one commit, "
                 f"written to {out}:")
            for name, size, sha in listing:
                echo(f"  {name:<48} {format_size(size, 2):>11}  sha256 {sha}")
            echo(f"upload it with: evaclip push {out} --repo {repo_id} --card {out / 'README.md'}")
            return {"dry_run": True, "out": str(out), "files": {n: {"size": s, "sha256": h} for n, s, h in listing}}
        assert token is not None  # checked above, before anything was staged
        return _upload(repo_id, files, token=token, private=private, revision=revision, create_pr=create_pr,
                       commit_message=commit_message or f"Upload {repo_id.split('/', 1)[1]} with evaclip {__version__}",
                       overwrite_card=overwrite_card, scrub=scrub, log=log, echo=echo)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if lock is not None:
            lock.release()


def _upload(repo_id: str, files: dict, *, token: str, private: bool, revision: Optional[str], create_pr: bool,
            commit_message: str, overwrite_card: bool, scrub: _Scrub, log, echo) -> dict:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its retry warnings: evaclip says it in one line of its own
    if not sys.stderr.isatty():
        disable_progress_bars()  # bars in a log file are noise; a terminal keeps them
    api = HfApi(token=token)
    step = lambda fn, what: with_retries(fn, what, repo_id, revision, scrub, log)  # noqa: E731
    step(lambda: api.create_repo(repo_id, private=True if private else None, exist_ok=True), "creating")
    if revision and not create_pr:
        step(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), "creating a branch on")
    kept_card = False
    if not overwrite_card:
        exists = step(lambda: api.file_exists(repo_id, "README.md", revision=revision), "reading")
        if exists:
            files = {k: v for k, v in files.items() if k != "README.md"}
            kept_card = True
    names = sorted(files)
    total = sum(files[n].stat().st_size for n in names)
    description = (f"{len(names)} files, {format_size(total, 2)}: " + ", ".join(names) + f" (evaclip {__version__})")

    def commit():
        ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(files[n])) for n in names]  # fresh per try
        return api.create_commit(repo_id, ops, commit_message=commit_message, commit_description=description,
                                 revision=revision, create_pr=create_pr)

    info = step(commit, "committing to")
    target = f"{repo_id}@{revision}" if revision else repo_id
    echo(f"pushed {len(names)} files ({format_size(total, 2)}) to {target} in one commit {info.oid[:12]}: "
         f"{info.commit_url}")
    if kept_card:
        echo("kept the README.md already on the Hub (pass --overwrite-card to replace it with the generated card)")
    if info.pr_url:
        echo(f"pull request: {info.pr_url}")
    return {"dry_run": False, "commit": info.oid, "commit_url": info.commit_url, "pr_url": info.pr_url,
            "files": names, "kept_card": kept_card}
