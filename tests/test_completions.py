"""Shell completion: the committed scripts are current, and real bash completes evaclip through them, fast."""
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evaclip_cli.cli import completions

ROOT = Path(__file__).resolve().parent.parent
COMPLETIONS = ROOT / "completions"
BIN = Path(sys.executable).parent  # the venv's bin/: holds the `evaclip` console script
HEAVY = ("torch", "open_clip", "deepspeed", "timm")


def test_committed_completions_are_current():
    fresh = completions.scripts()
    assert set(fresh) == {"evaclip.bash", "_evaclip", "evaclip.fish"}
    for name, text in fresh.items():
        path = COMPLETIONS / name
        assert path.is_file(), f"{path} is missing: run `make completions`"
        assert path.read_text() == text, f"{path} is stale: run `make completions`"
    assert completions.stale(COMPLETIONS) == []


def test_check_reports_stale_file(tmp_path):
    completions.write(tmp_path)
    assert completions.main(["check", str(tmp_path)]) == 0
    (tmp_path / "_evaclip").write_text("# edited\n")
    res = subprocess.run([sys.executable, "-m", "evaclip_cli.cli.completions", "check", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "_evaclip") in lines[0] and "evaclip.bash" not in lines[0]
    assert "make completions" in lines[0]


def test_scripts_use_typer_mechanism():
    bash, zsh, fish = (completions.script(s) for s in ("bash", "zsh", "fish"))
    for text in (bash, zsh, fish):
        assert "_EVACLIP_COMPLETE=complete_" in text
    assert zsh.startswith("#compdef evaclip\n")  # compinit only loads files whose first line is #compdef
    assert re.search(r"^complete .*-F \w+ evaclip$", bash, re.M)
    assert fish.count("complete --command evaclip") == 1


def _bash_func_name() -> str:
    m = re.search(r"^complete .*-F (\w+) evaclip$", (COMPLETIONS / "evaclip.bash").read_text(), re.M)
    assert m, "completions/evaclip.bash registers no completion function for evaclip"
    return m.group(1)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("_EVACLIP", "COMP_", "_TYPER"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def bash_complete(line: str) -> list[str]:
    """Complete ``line`` (cursor at its end) the way bash does on TAB: source the committed script, set
    COMP_WORDS/COMP_CWORD/COMP_LINE/COMP_POINT, call the function `complete -F` registered, print COMPREPLY."""
    assert (BIN / "evaclip").exists(), f"no evaclip console script next to {sys.executable}"
    words = line.split(" ")  # a trailing space gives the empty word being completed, as in bash
    cword = len(words) - 1
    func = _bash_func_name()
    script = "\n".join([
        "set -u",
        f"source {shlex.quote(str(COMPLETIONS / 'evaclip.bash'))}",
        # the function bash itself would call: read back from the registration, not from the file
        f"[[ \"$(complete -p evaclip)\" == *'-F {func} evaclip'* ]] || {{ echo 'not registered' >&2; exit 9; }}",
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})",
        f"COMP_CWORD={cword}",
        f"COMP_LINE={shlex.quote(line)}",
        "COMP_POINT=${#COMP_LINE}",
        "COMPREPLY=()",
        # bash calls the function with: command name, word being completed, word before it
        f"{func} evaclip {shlex.quote(words[cword])} {shlex.quote(words[cword - 1])}",
        'printf "%s\\n" "${COMPREPLY[@]}"',
    ])
    res = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True, text=True,
                         env=_env(), cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr
    return [w for w in res.stdout.splitlines() if w]


def test_bash_completes_command_name():
    assert bash_complete("evaclip rec") == ["recipes"]
    assert bash_complete("evaclip tr") == ["train"]
    assert bash_complete("evaclip data ") == ["inspect", "make-demo"] or \
        set(bash_complete("evaclip data ")) == {"inspect", "make-demo"}
    assert "--resume" in bash_complete("evaclip train --re")


def test_bash_completes_subcommands():
    got = bash_complete("evaclip recipes ")
    assert {"ls", "show", "cp"} <= set(got), got


def test_bash_completes_top_level_commands():
    assert {"recipes", "estimate", "convert"} <= set(bash_complete("evaclip "))


def test_bash_completes_recipe_names():
    got = bash_complete("evaclip estimate --recipe 1")
    assert "18b" in got, got
    assert all(n.startswith("1") for n in got), got
    assert "tiny" in bash_complete("evaclip recipes show t")


def test_bash_completes_options():
    got = bash_complete("evaclip estimate --")
    assert {"--recipe", "--gpu", "--gpus", "--json"} <= set(got), got
    assert set(bash_complete("evaclip estimate --gpu ")) == {"a100-40g", "a100-80g", "h100"}


def test_bash_completion_is_fast():
    bash_complete("evaclip estimate --recipe 1")  # warm the file cache
    t0 = time.perf_counter()
    assert "18b" in bash_complete("evaclip estimate --recipe 1")
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"one TAB took {elapsed:.2f}s; something heavy is imported on the completion path"


# The `evaclip` console script runs evaclip_entry.main, which marks the process as the command line before importing
# evaclip_cli: the integration with timm/open_clip (torch) then waits for the commands that build or load a model.
# A plain `import evaclip_cli` integrates at once (tests/test_integration.py).
AS_CONSOLE_SCRIPT = "import evaclip_entry; evaclip_entry.COMMAND_LINE = True"


def _run_entry(argv: list, env=None) -> subprocess.CompletedProcess:
    """``evaclip ARGV`` as the console script runs it (evaclip_entry.main), reporting the heavy modules it loaded."""
    code = "\n".join([
        "import sys, json, evaclip_entry",
        f"sys.argv = ['evaclip', *{argv!r}]",
        "try:",
        "    evaclip_entry.main()",
        "except SystemExit as e:",
        "    rc = e.code or 0",
        f"print(json.dumps({{'rc': rc, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}), file=sys.stderr)",
    ])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env or _env())


def test_cli_import_is_light():
    """The console script is evaclip_entry.main, and `evaclip --help` through it imports no torch/open_clip/timm."""
    script = (BIN / "evaclip").read_text()
    assert "from evaclip_entry import main" in script, "reinstall: pip install -e ."
    res = _run_entry(["--help"])
    assert "Usage" in res.stdout, res.stdout + res.stderr
    assert json.loads(res.stderr.strip().splitlines()[-1]) == {"rc": 0, "heavy": []}


def test_completion_path_is_light():
    """A completion request answered in-process (recipe callback included) imports no torch/open_clip."""
    env = _env()
    env.update(_EVACLIP_COMPLETE="complete_bash", COMP_WORDS="evaclip\nestimate\n--recipe\n1", COMP_CWORD="3")
    res = _run_entry([], env)
    assert "18b" in res.stdout.split(), res.stdout + res.stderr
    info = json.loads(res.stderr.strip().splitlines()[-1])
    assert info == {"rc": 0, "heavy": []}, info


def test_completions_module_is_light():
    code = (f"import sys, json; {AS_CONSOLE_SCRIPT}; import evaclip_cli.cli.completions as c; c.scripts(); "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(res.stdout) == []


@pytest.mark.parametrize("shell", ["powershell", "tcsh"])
def test_unsupported_shell(shell):
    with pytest.raises(ValueError):
        completions.script(shell)


def _app_commands(*group: str) -> set[str]:
    """Visible command names of the live Typer app (or of one of its groups): what completion should offer."""
    import typer.main

    from evaclip_cli.cli import app

    cmd = typer.main.get_command(app)
    for name in group:
        cmd = cmd.commands[name]
    return {name for name, c in cmd.commands.items() if not c.hidden}


def test_bash_completes_issue_examples():
    """`evaclip tr<TAB>` and `evaclip eval <TAB>` through real bash and the committed script; the expected names
    come from the Typer app, so the test follows the commands as they land."""
    top = _app_commands()
    assert "train" in top
    got = bash_complete("evaclip tr")
    assert "train" in got and set(got) == {n for n in top if n.startswith("tr")}, got
    evals = _app_commands("eval")
    assert evals, "the eval group has no commands"
    got = bash_complete("evaclip eval ")
    assert set(got) == evals, (got, evals)
    assert {"zeroshot", "retrieval", "suite"} & evals <= set(got)


def test_bash_completes_push():
    assert bash_complete("evaclip pu") == ["push"]
    assert {"--repo", "--results", "--revision"} <= set(bash_complete("evaclip push --re"))


def test_bash_completes_status():
    assert bash_complete("evaclip stat") == ["status"]
    assert "--json" in bash_complete("evaclip status --")
