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


def test_student_starts_as_the_papers_and_trains_no_longer(tmp_path, capsys):
    """The student CLIP: the distilled vision tower and the teacher's text tower (EVA-CLIP-18B's init), and no more
    steps than the teacher, in the demo and in the shipped tiny-student recipe."""
    from evaclip_cli.lifecycle import stages
    from evaclip_cli.recipes import load_recipe

    runs = tmp_path / "runs"
    teacher, _, student = stages(runs)[:3]
    args = [str(a) for a in student["argv"]]
    assert f"init.vision={runs / 'student' / 'final'}" in args and f"init.text={runs / 'teacher' / 'final'}" in args
    code, out, err = run_cli([*args, "--dry-run"], capsys)
    assert code == 0, err
    assert f'text = "{runs / "teacher" / "final"}"' in out
    steps = {}
    for name, st in (("teacher", teacher), ("student", student)):
        overrides = [a for a in map(str, st["argv"]) if "=" in a and not a.startswith("--")]
        steps[name] = load_recipe(st["argv"][2], overrides).recipe.steps
    assert 0 < steps["student"] <= steps["teacher"]
    shipped = load_recipe("tiny-student").recipe
    assert shipped.init.vision and shipped.init.text == "runs/demo/teacher/final"
    assert shipped.steps <= load_recipe("tiny").recipe.steps


def test_summary_says_whether_the_student_surpassed_its_teacher():
    from evaclip_cli.lifecycle import teacher_vs_student

    rows, verdict = teacher_vs_student({"shapes/acc1": 0.50, "colours/acc1": 0.70},
                                       {"shapes/acc1": 0.56, "colours/acc1": 0.70, "extra/acc1": 0.1}, (800, 400))
    assert rows == [("shapes", "50.0%", "56.0%", "+6.0"), ("colours", "70.0%", "70.0%", "+0.0")]
    assert verdict.startswith("The student CLIP surpassed its teacher") and "(+3.0 points)" in verdict
    assert "400 steps to the teacher's 800" in verdict
    _, verdict = teacher_vs_student({"shapes/acc1": 0.5}, {"shapes/acc1": 0.4})
    assert "did not surpass its teacher" in verdict and "(-10.0 points)" in verdict
    assert "nothing to compare" in teacher_vs_student({}, {"shapes/acc1": 0.4})[1]


def test_bad_stage_number(tmp_path, capsys):
    code, _, err = run_cli(["demo", "--out", tmp_path, "--from-stage", "9"], capsys)
    assert code == 2 and "--from-stage must be in 1..7" in err
    assert not any(Path(tmp_path).iterdir())
