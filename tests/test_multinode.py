"""Several nodes on one machine: torchrun per node, the written sbatch script under a Slurm stand-in, and the
DeepSpeed launcher with a hostfile each give the losses of `--nproc 2`.

What the Slurm stand-in (tests/helpers/slurm/srun, scontrol) exercises: the sbatch script evaclip writes, run by
bash with the variables sbatch sets (SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_JOB_NUM_NODES), `scontrol show
hostnames` for the master address, one `srun` task per node with SLURM_PROCID/NODEID/LOCALID, and torchrun's c10d
rendezvous between the per-node agents. What it does not: Slurm's scheduler, cgroups and GPU binding
(`--gpus-per-node`), nodes on different hosts (every "node" here is this machine, so the rendezvous address is
localhost), and `--kill-on-bad-exit` beyond killing the sibling tasks.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.runs import EVACLIP, ROOT, metrics, train

pytestmark = pytest.mark.slow

ARGS = ["--recipe", "tiny", "deepspeed.zero_stage=3", "data.samples=480", "data.global_batch=32",
        "data.micro_batch=16", "logging.log_every=1", "logging.checkpoint_every=0", "eval.every_steps=0",
        "data.workers=1"]
STANDIN = Path(__file__).parent / "helpers" / "slurm"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run)[0]]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    run = tmp_path_factory.mktemp("nproc2") / "run"
    train(env, run, *ARGS, "--nproc", "2")
    losses = _losses(run)
    assert len(losses) == 15
    return losses


def _assert_same(losses, reference):
    assert len(losses) == len(reference)
    diff = max(abs(a - b) for a, b in zip(losses, reference))
    assert diff < 1e-5, (diff, losses, reference)


def test_two_nodes_with_torchrun_per_node_match_nproc_2(env, reference, tmp_path):
    run, port = tmp_path / "run", str(_port())
    procs = [subprocess.Popen([*EVACLIP, "train", "--out", str(run), *ARGS, "--nodes", "2", "--node-rank", str(k),
                               "--master-addr", "127.0.0.1", "--master-port", port], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    _assert_same(_losses(run), reference)


def test_the_written_sbatch_script_under_a_slurm_standin_matches_nproc_2(env, reference, tmp_path):
    run = tmp_path / "run"
    r = train(env, run, *ARGS, "--nodes", "2", "--nproc", "1", "--master-addr", "ignored", "--launcher", "slurm")
    script = run / "launch.sbatch"
    assert script.is_file(), r.stdout
    text = script.read_text()
    assert "-m evaclip_cli.engine.launch" in text and "--nnodes=2 --nproc_per_node=1" in text
    venv_bin = str(Path(sys.executable).parent)
    slurm_env = {**env, "PATH": f"{STANDIN}:{venv_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
                 "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
                 "MASTER_PORT": str(_port())}
    res = subprocess.run(["bash", str(script)], env=slurm_env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same(_losses(run), reference)


def test_deepspeed_launcher_with_a_localhost_hostfile_matches_nproc_2(env, reference, tmp_path):
    run = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    venv_bin = str(Path(sys.executable).parent)
    ds_env = {**env, "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    r = subprocess.run([*EVACLIP, "train", "--out", str(run), *ARGS, "--hostfile", str(hostfile),
                        "--master-port", str(_port())], env=ds_env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _assert_same(_losses(run), reference)


def test_deepspeed_launcher_from_a_venv_not_on_path_matches_nproc_2(env, reference, tmp_path):
    import shutil

    run = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != venv_bin.resolve())
    assert shutil.which("deepspeed", path=path) is None  # what `deepspeed` from PATH would fail on
    r = subprocess.run([str(venv_bin / "evaclip"), "train", "--out", str(run), *ARGS, "--hostfile", str(hostfile),
                        "--launcher", "deepspeed", "--master-port", str(_port())], env={**env, "PATH": path},
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _assert_same(_losses(run), reference)


def _slurm_env(env, tmp_path) -> dict:
    """What sbatch gives the script of job 4242 on two nodes (both this machine), the stand-ins first on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    return {**env, "PATH": f"{STANDIN}:{venv_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2",
            "MASTER_PORT": str(_port()), "SLURM_REQUEUE_LOG": str(tmp_path / "requeued")}


def test_slurm_warning_stops_the_job_with_its_checkpoint_and_the_requeued_job_matches_nproc_2(env, reference,
                                                                                               tmp_path):
    import json
    import signal
    import time

    run = tmp_path / "run"
    train(env, run, *ARGS, "--nodes", "2", "--nproc", "1", "--master-addr", "ignored", "--launcher", "slurm")
    script = run / "launch.sbatch"
    text = script.read_text()
    assert "#SBATCH --signal=B:USR1@600" in text and "#SBATCH --requeue" in text
    slurm_env = _slurm_env(env, tmp_path)
    job = subprocess.Popen(["bash", str(script)], env=slurm_env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not ((run / "metrics.jsonl").is_file() and len(metrics(run)[0]) >= 5):
            assert time.time() < deadline and job.poll() is None, job.communicate()[1][-3000:]
            time.sleep(0.1)
        os.kill(job.pid, signal.SIGUSR1)  # slurm's warning before the time limit: to the batch shell only
        out, err = job.communicate(timeout=600)
    finally:
        for pid in [*_descendants(job.pid), job.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert job.returncode == 75, err[-3000:]
    assert (tmp_path / "requeued").read_text().split() == ["4242"]
    assert "requeueing job 4242 (restart 1 of at most 20)" in err
    steps = sorted(int(p.name.removeprefix("global_step")) for p in (run / "checkpoints").glob("global_step*"))
    stopped = metrics(run)[0][-1]["step"]
    assert steps == [stopped] and 5 <= stopped < 15, (steps, stopped)  # the stop wrote the step it reached
    assert not (run / "STOP").exists()
    # slurm runs the requeued job's script again, SLURM_RESTART_COUNT=1: it resumes (--resume auto) and finishes
    res = subprocess.run(["bash", str(script)], env={**slurm_env, "SLURM_RESTART_COUNT": "1",
                                                     "MASTER_PORT": str(_port())},
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "requeued").read_text().split() == ["4242"]  # finished: not requeued again
    by_step = {}
    for ln in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(ln)
        if "loss" in row:
            by_step[row["step"]] = row["loss"]
    _assert_same([by_step[k] for k in sorted(by_step)], reference)


def test_a_node_that_dies_mid_step_ends_the_other_with_one_line_then_resume(env, tmp_path):
    import os
    import signal
    import time

    run, port = tmp_path / "run", str(_port())
    args = [*ARGS, "data.samples=64000", "logging.checkpoint_every=10"]  # long enough to be killed mid-run
    procs = [subprocess.Popen([*EVACLIP, "train", "--out", str(run), *args, "--nodes", "2", "--node-rank", str(k),
                               "--master-addr", "127.0.0.1", "--master-port", port], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for k in (0, 1)]
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if (run / "checkpoints" / "global_step10").is_dir() and len(metrics(run)[0]) >= 13:
                break
            time.sleep(0.2)
        for pid in [procs[1].pid, *_descendants(procs[1].pid)]:  # node 1: agent, rank, loader workers at once
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        t0 = time.time()
        out, err = procs[0].communicate(timeout=120)
        took = time.time() - t0
    finally:
        for p in procs:
            for pid in [*_descendants(p.pid), p.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert procs[0].returncode == 3, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("evaclip: rank 0 lost another process of the job at step "), lines[0]
    assert "with --resume auto" in lines[0] and "Traceback" not in err and took < 60, (took, lines)
    # the job goes on from the last complete checkpoint, here on one machine with 2 processes, shortened to 30 steps
    # (a changed run length: --accept-changes)
    r = train(env, run, *ARGS, "data.samples=960", "logging.checkpoint_every=10", "--nproc", "2", "--resume", "auto",
              "--accept-changes")
    assert "resumed from" in r.stdout and metrics(run)[0][-1]["step"] == 30
