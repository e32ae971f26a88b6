"""The CLI surface: help, version, recipes ls/show/cp, and user errors as one line on stderr with exit code 2."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from evaclip_cli import __version__
from evaclip_cli.recipes import builtin_names, load_recipe

from conftest import run_cli

EVACLIP = Path(sys.executable).parent / "evaclip"  # the console script of this venv


def evaclip(*args, cwd=None):
    """Run the installed console script; returns the CompletedProcess (text)."""
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("_EVACLIP_COMPLETE", None)
    return subprocess.run([str(EVACLIP), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def assert_user_error(code, out, err, *needles):
    """Exit code 2, nothing on stdout, exactly one line on stderr: 'evaclip: error: ...' containing needles."""
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("evaclip: error:"), err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------------------------------------- help, version
def test_help_lists_commands(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for cmd in ("recipes", "estimate", "convert"):
        assert cmd in out


def test_no_args_shows_help():
    res = evaclip()
    assert "recipes" in res.stdout + res.stderr and "Usage" in res.stdout + res.stderr


def test_version_console_script():
    res = evaclip("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"evaclip {__version__}\n" == "evaclip 0.1.0\n"


def test_version_in_process(capsys):
    assert run_cli(["--version"], capsys) == (0, "evaclip 0.1.0\n", "")


def test_recipes_help(capsys):
    code, out, _ = run_cli(["recipes", "--help"], capsys)
    assert code == 0
    for sub in ("ls", "show", "cp"):
        assert sub in out


# --------------------------------------------------------------------------------------------------- recipes ls
def test_recipes_ls_lists_every_shipped_recipe():
    res = evaclip("recipes", "ls")
    assert res.returncode == 0, res.stderr
    names = builtin_names()
    assert len(names) >= 10
    first_col = {line.split("│")[1].strip() for line in res.stdout.splitlines() if line.count("│") > 2}
    assert set(names) <= first_col, set(names) - first_col


def test_recipes_ls_in_process(capsys):
    code, out, _ = run_cli(["recipes", "ls"], capsys)
    assert code == 0
    for name in builtin_names():
        assert name in out


# ------------------------------------------------------------------------------------------------- recipes show
def test_recipes_show_18b_is_the_papers_recipe(capsys):
    code, out, err = run_cli(["recipes", "show", "18b"], capsys)
    assert code == 0, err
    assert out.startswith("# 18b.toml\n")
    r = tomllib.loads(out)
    opt, sched, ds, data = r["optimizer"], r["schedule"], r["deepspeed"], r["data"]
    assert opt["name"] == "lamb"
    assert opt["lr"] == 4e-4 and opt["text_lr"] == 4e-5
    assert opt["layer_decay"] == 0.9 and opt["text_layer_decay"] == 0.75
    assert opt["weight_decay"] == 0.05
    assert sched["warmup_steps"] == 2000 and sched["kind"] == "cosine"
    assert ds["grad_clip"] == 5.0 and ds["precision"] == "bf16" and ds["zero_stage"] == 3
    assert data["global_batch"] == 108000 and data["samples"] == 6e9
    assert r["model"]["grad_checkpointing"] is True
    assert r["model"]["arch"] == "18b" and r["name"] == "18b"


def test_recipes_show_override(capsys):
    code, out, err = run_cli(["recipes", "show", "18b", "optimizer.lr=1e-4"], capsys)
    assert code == 0, err
    r = tomllib.loads(out)
    assert r["optimizer"]["lr"] == 1e-4
    assert r["optimizer"]["text_lr"] == 4e-5  # untouched keys keep the recipe's values


def test_recipes_show_output_loads_back(tmp_path, capsys):
    code, out, _ = run_cli(["recipes", "show", "8b"], capsys)
    assert code == 0
    p = tmp_path / "shown.toml"
    p.write_text(out)
    assert load_recipe(str(p)).recipe == load_recipe("8b").recipe  # `show` prints the name, so it survives


def test_recipes_show_user_file_extends_from_any_cwd(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "base.toml").write_text('extends = "tiny"\n\n[optimizer]\nlr = 0.01\n')
    (sub / "child.toml").write_text('extends = "base.toml"\n\n[data]\nworkers = 3\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd, arg in ((tmp_path, "sub/child.toml"), (elsewhere, str(sub / "child.toml")), (sub, "child.toml")):
        res = evaclip("recipes", "show", arg, "deepspeed.grad_clip=2.5", cwd=cwd)
        assert res.returncode == 0, (cwd, res.stderr)
        assert res.stdout.splitlines()[0] == "# child.toml <- base.toml <- tiny.toml"
        r = tomllib.loads(res.stdout)
        assert r["name"] == "child"
        assert r["optimizer"]["lr"] == 0.01  # from base.toml
        assert r["data"]["workers"] == 3  # from child.toml
        assert r["data"]["global_batch"] == 64 and r["model"]["arch"] == "tiny"  # from the shipped tiny
        assert r["deepspeed"]["grad_clip"] == 2.5  # from the command line


def test_recipes_show_shipped_name_from_any_cwd(tmp_path):
    res = evaclip("recipes", "show", "tiny", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert tomllib.loads(res.stdout)["model"]["arch"] == "tiny"


# --------------------------------------------------------------------------------------------------- recipes cp
def test_recipes_cp_roundtrip_and_force(tmp_path, capsys):
    dest = tmp_path / "mine.toml"
    code, out, err = run_cli(["recipes", "cp", "tiny", dest], capsys)
    assert code == 0, err
    assert dest.is_file() and str(dest) in out
    copied = load_recipe(str(dest)).recipe
    original = load_recipe("tiny").recipe
    assert copied.model_dump(exclude={"name"}) == original.model_dump(exclude={"name"})
    assert "extends" not in tomllib.loads(dest.read_text())  # standalone

    before = dest.read_text()
    code, out, err = run_cli(["recipes", "cp", "tiny", dest, "optimizer.lr=0.5"], capsys)
    assert_user_error(code, out, err, str(dest), "--force")
    assert dest.read_text() == before  # untouched

    code, _, err = run_cli(["recipes", "cp", "tiny", dest, "optimizer.lr=0.5", "--force"], capsys)
    assert code == 0, err
    assert load_recipe(str(dest)).recipe.optimizer.lr == 0.5


def test_recipes_cp_into_directory(tmp_path, capsys):
    code, _, err = run_cli(["recipes", "cp", "18b", tmp_path], capsys)
    assert code == 0, err
    assert load_recipe(str(tmp_path / "18b.toml")).recipe == load_recipe("18b").recipe


# ----------------------------------------------------------------------------------------------------- errors
def test_unknown_recipe(capsys):
    line = assert_user_error(*run_cli(["recipes", "show", "18x"], capsys), "18x", "did you mean")
    assert "'18b'" in line


def test_unknown_recipe_estimate(capsys):
    assert_user_error(*run_cli(["estimate", "--recipe", "tinyy"], capsys), "did you mean 'tiny'")


def test_unknown_override_key(capsys):
    assert_user_error(*run_cli(["recipes", "show", "18b", "optimizer.lrr=1"], capsys),
                      "optimizer.lrr", "optimizer.lr'")


def test_malformed_override(capsys):
    assert_user_error(*run_cli(["recipes", "show", "18b", "optimizer.lr"], capsys), "section.key=value")


def test_unknown_key_in_user_file(tmp_path, capsys):
    p = tmp_path / "mine.toml"
    p.write_text('extends = "tiny"\n\n[optimizer]\nlearning_rate = 1\n')
    assert_user_error(*run_cli(["recipes", "show", p], capsys),
                      str(p.resolve()), "optimizer.learning_rate", "did you mean 'optimizer.lr'")


def test_invalid_toml(tmp_path, capsys):
    p = tmp_path / "broken.toml"
    p.write_text('extends = "tiny"\n[optimizer\nlr = 1\n')
    assert_user_error(*run_cli(["recipes", "show", p], capsys), str(p.resolve()), "invalid TOML")


def test_invalid_toml_in_parent(tmp_path, capsys):
    (tmp_path / "parent.toml").write_text("lr = = 1\n")
    child = tmp_path / "child.toml"
    child.write_text('extends = "parent.toml"\n')
    assert_user_error(*run_cli(["recipes", "show", child], capsys), "parent.toml", "invalid TOML")


def test_extends_cycle(tmp_path, capsys):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    assert_user_error(*run_cli(["recipes", "show", tmp_path / "a.toml"], capsys), "cycle", "a.toml", "b.toml")


def test_bad_value_names_source(tmp_path, capsys):
    p = tmp_path / "mine.toml"
    p.write_text('extends = "tiny"\n\n[deepspeed]\nzero_stage = 5\n')
    assert_user_error(*run_cli(["recipes", "show", p], capsys), str(p.resolve()), "deepspeed.zero_stage")


def test_convert_missing_file(tmp_path, capsys):
    assert_user_error(*run_cli(["convert", tmp_path / "missing.pt", tmp_path / "out"], capsys), "missing.pt")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [
    ["recipes", "show", "nope"],
    ["recipes", "show", "18b", "optimizer.lrr=1"],
    ["convert", "/nonexistent/evaclip/missing.pt", "/nonexistent/evaclip/out"],
])
def test_console_script_errors_are_one_line(args):
    res = evaclip(*args)
    assert_user_error(res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
