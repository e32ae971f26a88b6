"""Nothing lost, nothing misstated (issue 24): convert never touches its own source, --resume PATH never overwrites
another run, outputs are checked before the work, a full disk is one line, a run that cannot fit is refused."""
import hashlib
import shutil
from pathlib import Path

from conftest import run_cli


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys, args) -> str:
    code, out, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("evaclip: error:"), (code, out, err)
    return lines[0]


# ------------------------------------------------------------------------------------ convert and its own source
def test_convert_never_writes_into_or_over_its_own_source(tiny_clip_folder, tmp_path, capsys):
    run = tmp_path / "run"
    src = run / "checkpoints"
    shutil.copytree(tiny_clip_folder, src)
    (run / "metrics.jsonl").write_text("{}\n")
    before, run_before = _digest(src), _digest(run)
    alias = tmp_path / "alias"
    alias.symlink_to(src, target_is_directory=True)
    cases = [([src, src], "is the source itself"), ([src, src, "--force"], "is the source itself"),
             ([src, run, "--force"], "contains the source"), ([src, run], "contains the source"),
             ([src, src / "oc"], "is inside the source"), ([src, src / "oc", "--force"], "is inside the source"),
             ([alias, src, "--force"], "is the source itself"), ([src, alias / "oc"], "is inside the source")]
    for args, how in cases:
        line = _one_line(capsys, ["convert", *args])
        assert how in line and "--force" not in line, (args, line)
        assert _digest(src) == before and _digest(run) == run_before, args
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.jsonl"]
    # an output beside the source is fine, and "pass --force" is offered where --force is safe
    beside = run / "oc"
    beside.mkdir()
    assert "pass --force to replace it" in _one_line(capsys, ["convert", src, beside])
    assert run_cli(["convert", src, beside, "--force"]) == 0
    assert (beside / "open_clip_config.json").is_file() and _digest(src) == before
