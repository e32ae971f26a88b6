"""A job ends with the process that started it (evaclip_cli/lifeline.py, engine/launch.py): the parent-death
signal and the launcher poll of a rank, the launcher's stop signals, and (slow) a 2-rank `evaclip train --nproc 2`
whose launcher is killed (SIGKILL) or interrupted (SIGINT to its process group, as a terminal sends it)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.runs import ROOT, metrics, train

# the module alone, by path: importing the package would load torch and open_clip in every helper process
LIFELINE = f"""
import importlib.util
_spec = importlib.util.spec_from_file_location("lifeline", {str(ROOT / "evaclip_cli" / "lifeline.py")!r})
lifeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lifeline)
"""
RANK = LIFELINE + """
import os, sys, time
watch_launcher = lifeline.watch_launcher
watch_launcher()
open(sys.argv[1], "w").write(f"{os.getpid()} ready")
time.sleep(120)
"""
STARTER = LIFELINE + """
import os, subprocess, sys, time
launcher_env = lifeline.launcher_env
if sys.argv[1] == "launcher":
    os.environ.update(launcher_env())
child = subprocess.Popen([sys.executable, *sys.argv[2:]], start_new_session=sys.argv[1] == "agent")
open(sys.argv[-1] + "." + sys.argv[1], "w").write(str(child.pid))  # PIDFILE.launcher: its child
time.sleep(120)
"""


def _gone(pid: int, within: float) -> bool:
    """Whether process ``pid`` has ended (or is a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def _chain(tmp_path, with_agent: bool) -> tuple[subprocess.Popen, int]:
    """A launcher (its identity in EVACLIP_LAUNCHER) -> [an agent that is not our code] -> a rank that watches;
    returns (launcher, rank pid)."""
    (tmp_path / "rank.py").write_text(RANK)
    (tmp_path / "starter.py").write_text(STARTER)
    pidfile = tmp_path / "rank.pid"
    rank = [str(tmp_path / "rank.py"), str(pidfile)]
    args = ["launcher", str(tmp_path / "starter.py"), "agent", *rank] if with_agent else ["launcher", *rank]
    launcher = subprocess.Popen([sys.executable, str(tmp_path / "starter.py"), *args], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while not (pidfile.is_file() and pidfile.read_text().endswith("ready")):
        assert time.monotonic() < deadline and launcher.poll() is None, "the chain did not start"
        time.sleep(0.05)
    return launcher, int(pidfile.read_text().split()[0])


def test_a_rank_dies_with_its_parent_killed_by_sigkill(tmp_path):
    launcher, rank = _chain(tmp_path, with_agent=False)
    try:
        launcher.kill()
        launcher.wait()
        assert _gone(rank, 3), "the rank outlived its parent"
    finally:
        _kill(rank)


def test_a_rank_dies_with_a_launcher_that_is_not_its_parent(tmp_path):
    # launcher -> an agent that stays alive (not our code, no parent-death signal) -> the rank: the rank polls
    launcher, rank = _chain(tmp_path, with_agent=True)
    agent = int((tmp_path / "rank.pid.launcher").read_text())  # the launcher's child
    try:
        launcher.kill()
        launcher.wait()
        assert _gone(rank, 3), "the rank outlived its launcher"
        assert not _gone(agent, 0.2)  # the agent itself was not asked to die: the rank noticed by polling
    finally:
        _kill(rank)
        _kill(agent)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_identity_tells_a_reused_pid_and_another_host():
    from evaclip_cli.lifeline import alive, identity

    me = identity()
    assert alive(me)
    host, pid, start = me.rsplit(":", 2)
    assert not alive(f"{host}:{pid}:{int(start) + 1}")  # same pid, another process
    assert alive(f"elsewhere-{host}:{pid}:1")  # not checkable from here: not declared dead
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    ident = identity(p.pid)
    p.wait()
    assert not alive(ident)


def test_the_launcher_turns_a_stop_signal_into_a_stop_request_and_ignores_sigusr1_otherwise(tmp_path, capsys):
    from evaclip_cli.engine.launch import _restore, _stop_handlers

    previous = _stop_handlers(tmp_path, ("SIGTERM", "SIGUSR1"))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
    finally:
        _restore(previous)
    assert "SIGUSR1 to the launcher" in (tmp_path / "STOP").read_text()
    assert "the job stops after the current step" in capsys.readouterr().err
    (tmp_path / "STOP").unlink()
    previous = _stop_handlers(tmp_path, ("SIGTERM",))  # SIGUSR1 not a stop signal: ignored, never fatal
    try:
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR1)
    finally:
        _restore(previous)
    assert not (tmp_path / "STOP").exists()


# ------------------------------------------------------------------------------------------------ a real job
ARGS = ["--recipe", "tiny", "data.global_batch=32", "data.micro_batch=16", "logging.log_every=1",
        "logging.checkpoint_every=3", "eval.every_steps=0", "data.workers=1"]


def _job_processes(run: Path) -> list[int]:
    """Every live process whose command line names the run folder (the launcher, the ranks, their data workers)."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if f"--out {run} " in cmd and state != "Z" and int(d.name) != os.getpid():
            out.append(int(d.name))
    return out


def _start_and_stop(env, run: Path, stop) -> tuple[subprocess.Popen, float, str]:
    """Start a long 2-rank run, wait for its first checkpoint and a step after it, ``stop(launcher)``; returns
    (launcher, seconds until no process of the job was left, stderr)."""
    launcher = subprocess.Popen([sys.executable, "-m", "evaclip_cli.cli", "train", "--out", str(run), *ARGS,
                                 "data.samples=64000", "--nproc", "2"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 400
        while not ((run / "checkpoints" / "global_step3").is_dir() and (run / "metrics.jsonl").is_file()
                   and len(metrics(run)[0]) >= 4):
            assert time.time() < deadline and launcher.poll() is None, launcher.stderr.read()[-3000:]
            time.sleep(0.2)
        assert len(_job_processes(run)) >= 5  # launcher, 2 ranks, a data worker each
        t0 = time.monotonic()
        stop(launcher)
        while _job_processes(run) and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        took = time.monotonic() - t0
        err = launcher.communicate(timeout=60)[1]
    finally:
        for pid in _job_processes(run):
            _kill(pid)
    return launcher, took, err


def _resume(env, run: Path) -> None:
    """``--resume auto`` continues the job (the lock is free) for a step past its last checkpoint."""
    last = max(int(p.name.removeprefix("global_step")) for p in (run / "checkpoints").glob("global_step*"))
    r = train(env, run, *ARGS, f"data.samples={32 * (last + 1)}", "--nproc", "2", "--resume", "auto",
              "--accept-changes")  # a shorter run (data.samples) than the one stopped
    assert "resumed from" in r.stdout and metrics(run)[0][-1]["step"] == last + 1


@pytest.mark.slow
def test_sigkill_of_the_launcher_ends_every_process_of_the_job_then_resume(env, tmp_path):
    run = tmp_path / "run"
    launcher, took, err = _start_and_stop(env, run, lambda p: os.kill(p.pid, signal.SIGKILL))
    assert launcher.returncode == -signal.SIGKILL
    assert took < 10, f"processes of the job were left {took:.1f} s after the launcher was killed"
    print(f"no process of the job left {took:.2f} s after SIGKILL of the launcher")
    _resume(env, run)


@pytest.mark.slow
def test_ctrl_c_ends_every_process_of_the_job_with_one_line_naming_the_checkpoint_then_resume(env, tmp_path):
    run = tmp_path / "run"
    launcher, took, err = _start_and_stop(env, run, lambda p: os.killpg(p.pid, signal.SIGINT))
    assert launcher.returncode == 130, err[-3000:]
    assert took < 10, f"processes of the job were left {took:.1f} s after Ctrl-C"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("evaclip: interrupted (SIGINT): every process of the job has stopped; the last "
                               f"complete checkpoint is {run / 'checkpoints' / 'global_step'}"), lines[0]
    assert lines[0].endswith("continue with --resume auto")
    print(f"no process of the job left {took:.2f} s after Ctrl-C")
    _resume(env, run)


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_the_job_gracefully_at_a_checkpoint(env, tmp_path):
    run = tmp_path / "run"
    launcher, took, err = _start_and_stop(env, run, lambda p: os.kill(p.pid, signal.SIGTERM))
    assert launcher.returncode == 75, err[-3000:]
    assert "SIGTERM: the job stops after the current step with a checkpoint" in err
    last = max(int(p.name.removeprefix("global_step")) for p in (run / "checkpoints").glob("global_step*"))
    assert last == metrics(run)[0][-1]["step"] and last > 3  # the step it reached was written: none lost
    assert not (run / "STOP").exists()
