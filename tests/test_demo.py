"""`evaclip demo`: the lifecycle's stage commands are valid (recipes and overrides resolve, the launcher accepts them);
the whole chain itself runs in `make demo`."""
from pathlib import Path

from conftest import run_cli


def test_stage_commands_resolve(tmp_path, capsys):
    from evaclip_cli.lifecycle import stages

    plan = stages(tmp_path / "runs")
    assert [s["name"] for s in plan] == ["train (teacher)", "distill", "train (student CLIP)", "finetune-video",
                                         "convert", "eval suite", "push --dry-run"]
    for st in plan[:4]:  # the training stages: resolved and planned, nothing run
        code, out, err = run_cli([*map(str, st["argv"]), "--dry-run"], capsys)
        assert code == 0, (st["name"], err)
        assert "global batch" in out
    code, out, err = run_cli([*map(str, plan[3]["argv"]), "--dry-run"], capsys)
    assert "width = 128" in out and "clip = " in out  # the video stage continues the student CLIP


def test_bad_stage_number(tmp_path, capsys):
    code, _, err = run_cli(["demo", "--out", tmp_path, "--from-stage", "9"], capsys)
    assert code == 2 and "--from-stage must be in 1..7" in err
    assert not any(Path(tmp_path).iterdir())
