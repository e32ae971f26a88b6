"""The docs cannot drift from the CLI: every `evaclip ...` line of README.md and docs/*.md that ends in `--help` or
`--dry-run` runs and exits 0 (in a folder where the example's inputs exist: `runs/tiny` is a tiny open_clip
folder); every relative link resolves; the README stays a page."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands():
    out = []
    for path in DOCS:
        for line in path.read_text().splitlines():
            cmd = re.split(r"\s+#", line.strip(), maxsplit=1)[0].strip()
            if cmd.startswith("evaclip ") and cmd.endswith(("--help", "--dry-run")):
                out.append(pytest.param(cmd, id=f"{path.name}: {cmd}"))
    return out


def test_docs_have_runnable_lines():
    assert len(_commands()) >= 20


@pytest.mark.parametrize("cmd", _commands())
def test_doc_line_runs(cmd, env, tmp_path, tiny_clip_folder):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(tiny_clip_folder)
    r = subprocess.run([sys.executable, "-m", "evaclip_cli.cli", *shlex.split(cmd)[1:]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr


def test_relative_links_resolve():
    bad = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if not re.match(r"[a-z]+://", target) and not (path.parent / target).exists():
                bad.append(f"{path.name}: {target}")
    assert not bad, bad


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 12_000, len(text)
    assert "make demo" in text and "make test" in text
