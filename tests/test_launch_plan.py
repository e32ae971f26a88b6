"""The launch planner (engine/launch.py): every plan kind and edge case, decided without starting, binding or
writing anything; plus the CLI's wiring of it (the command line handed over explicitly, dry-run output)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from evaclip_cli.engine import launch
from evaclip_cli.engine.launch import (
    DeepSpeedLauncher,
    DryRun,
    LaunchOptions,
    RunHere,
    Sbatch,
    Torchrun,
    plan,
    plan_eval,
)
from evaclip_cli.errors import UserError
from evaclip_cli.recipes import load_recipe

ROOT = Path(__file__).resolve().parent.parent
PY = "/opt/python"  # a stand-in interpreter path: plans name it, nothing runs it


def no_port():
    raise AssertionError("the planner asked for a free port where it needs none")


def make(argv, stage="train", recipe="tiny", overrides=None, under=False, port=lambda: 4242, **opts):
    if overrides is None:  # the tiny recipes' micro batch is their global batch: let 2 and 4 processes split it
        overrides = ["data.micro_batch=16"] if "tiny" in recipe else []
    r = load_recipe(recipe, list(overrides)).recipe
    return plan(stage, r, LaunchOptions(**opts), argv, recipe_ref=recipe,
                under_launcher=under, free_port=port, python=PY)


# --------------------------------------------------------------------------------------------------- run here
def test_single_process_runs_here():
    p = make(["train"], port=no_port)
    assert p == RunHere(Path("runs/tiny"))


def test_out_folder_is_the_run_folder():
    r = load_recipe("tiny").recipe
    p = plan("train", r, LaunchOptions(), ["train", "-o", "x"], recipe_ref="tiny", out=Path("x"),
             under_launcher=False, free_port=no_port)
    assert p == RunHere(Path("x"))


@pytest.mark.parametrize("opts", [dict(nproc=2), dict(nproc=2, nodes=2, master_addr="10.0.0.1"),
                                  dict(launcher="deepspeed"), dict(hostfile=Path("/nonexistent/hostfile")),
                                  dict(nproc=2, nodes=2)])  # a rank: whatever the options (stripped for children)
def test_under_a_launcher_every_rank_runs_here(opts):
    assert make(["train"], under=True, port=no_port, **opts) == RunHere(Path("runs/tiny"))


def test_under_launcher_reads_the_environment_given():
    assert launch.under_launcher({"LOCAL_RANK": "0"}) and launch.under_launcher({"OMPI_COMM_WORLD_RANK": "3"})
    assert not launch.under_launcher({"RANK": "0", "WORLD_SIZE": "1"})


# --------------------------------------------------------------------------------------------------- torchrun
def test_local_processes_relaunch_with_torchrun_on_a_free_port():
    argv = ["train", "--recipe", "tiny", "--nproc", "2", "optimizer.lr=1e-3"]
    p = make(argv, nproc=2)
    assert isinstance(p, Torchrun)
    assert p.args == ("--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1", "--master_port=4242",
                      "--no-python", PY, "-m", "evaclip_cli.cli", "train", "--recipe", "tiny", "optimizer.lr=1e-3")
    assert p.command[0] == "torchrun"


def test_master_port_given_is_used():
    p = make(["train", "--nproc", "2", "--master-port=1234"], nproc=2, master_port=1234, port=no_port)
    assert "--master_port=1234" in p.args and "--master-port=1234" not in p.args


def test_multi_node_torchrun():
    argv = ["train", "--nproc", "8", "--nodes", "9", "--node-rank", "2", "--master-addr", "10.0.0.1"]
    p = make(argv, recipe="18b", overrides=(), nproc=8, nodes=9, node_rank=2, master_addr="10.0.0.1", port=no_port)
    assert p.args[:5] == ("--nproc_per_node=8", "--nnodes=9", "--node_rank=2", "--master_addr=10.0.0.1",
                          "--master_port=29500")
    assert p.args[-1] == "train"  # every launcher option stripped


def test_multi_node_without_master_addr_is_a_user_error():
    with pytest.raises(UserError, match="--nodes > 1 needs --master-addr"):
        make(["train"], recipe="18b", nproc=8, nodes=2, port=no_port)
    with pytest.raises(UserError, match="--master-addr"):  # in a dry run too
        make(["train"], recipe="18b", nproc=8, nodes=2, dry_run=True, port=no_port)


# ------------------------------------------------------------------------------------------ deepspeed launcher
def test_hostfile_starts_deepspeed_launcher(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("node1 slots=8\nnode2 slots=8\n")
    argv = ["train", "--recipe", "18b", "--hostfile", str(hf), "--nproc", "8", "--master-addr", "node1"]
    p = make(argv, recipe="18b", hostfile=hf, nproc=8, master_addr="node1", port=no_port)
    assert p.command == DeepSpeedLauncher(("deepspeed", "--hostfile", str(hf), "--no_local_rank", "--num_gpus", "8",
                                           "--master_addr", "node1", "--module", "evaclip_cli.cli", "train",
                                           "--recipe", "18b")).command
    assert p.stop_signals == ("SIGTERM", "SIGUSR1") and p.out_dir is not None


def test_launcher_deepspeed_defaults_to_a_hostfile_named_hostfile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    p = make(["train", "--launcher", "deepspeed"], launcher="deepspeed", port=no_port)
    assert p.command[:3] == ("deepspeed", "--hostfile", "hostfile")


def test_a_local_hostfile_needs_no_ssh_and_its_slots_are_the_ranks(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("# this machine\nlocalhost slots=2\n")
    p = make(["train", "--recipe", "18b", "--hostfile", str(hf)], recipe="18b", hostfile=hf, port=no_port,
             master_port=29511)
    assert p.command[:9] == ("deepspeed", "--hostfile", str(hf), "--no_local_rank", "--no_ssh_check", "--master_addr",
                             "127.0.0.1", "--master_port", "29511")
    assert "--num_gpus" not in p.command  # the hostfile's slots decide
    dry = make(["train", "--recipe", "tiny", "--hostfile", str(hf), "--dry-run"], recipe="tiny", hostfile=hf,
               dry_run=True, port=no_port)
    assert dry.summary.startswith("2 process(es)"), dry.summary
    hf.write_text("localhost slots=two\n")
    with pytest.raises(UserError, match="no valid slots=N"):
        make(["train"], hostfile=hf, port=no_port)


@pytest.mark.parametrize("opts", [dict(hostfile=Path("/nonexistent/evaclip/hosts")), dict(launcher="deepspeed")])
def test_missing_hostfile_is_a_user_error(tmp_path, monkeypatch, opts):
    monkeypatch.chdir(tmp_path)  # no ./hostfile either
    for dry in (False, True):
        with pytest.raises(UserError, match="no such file"):
            make(["train"], dry_run=dry, port=no_port, **opts)


# ------------------------------------------------------------------------------------------------------ sbatch
def test_slurm_plans_a_batch_script_in_the_run_folder():
    argv = ["train", "--recipe", "18b", "--launcher", "slurm", "--nodes", "45", "--nproc", "8"]
    p = make(argv, recipe="18b", launcher="slurm", nodes=45, nproc=8, port=no_port)
    assert isinstance(p, Sbatch) and p.path == Path("runs/18b/launch.sbatch")
    assert "#SBATCH --nodes=45" in p.script and "--nproc_per_node=8" in p.script
    assert f"--no-python {PY} -m evaclip_cli.cli train --recipe 18b --resume auto" in p.script
    assert "--launcher" not in p.script and "--nodes 45" not in p.script


def test_slurm_wins_even_under_a_launcher():
    assert isinstance(make(["train"], launcher="slurm", under=True, port=no_port), Sbatch)


def test_slurm_dry_run_shows_the_script():
    p = make(["train"], launcher="slurm", dry_run=True, port=no_port)
    assert isinstance(p, DryRun) and isinstance(p.target, Sbatch)


# ----------------------------------------------------------------------------------------------------- dry run
def test_dry_run_of_a_single_process():
    p = make(["train", "--recipe", "tiny", "--dry-run", "optimizer.lr=0.5"], overrides=["optimizer.lr=0.5"],
             dry_run=True, under=True, port=no_port)  # a dry run never runs, under a launcher either
    assert isinstance(p, DryRun) and p.target == RunHere(Path("runs/tiny"))
    assert p.command == ("evaclip", "train", "--recipe", "tiny", "optimizer.lr=0.5")
    assert p.title == "evaclip train --recipe tiny (dry run)"
    assert "lr = 0.5" in p.recipe_toml and 'name = "tiny"' in p.recipe_toml
    assert p.summary == ("1 process(es) × micro batch 64 × accumulation 1 = global batch 64; 800 steps; "
                         "output runs/tiny")


def test_dry_run_shows_the_accumulation():
    p = make(["train", "--nproc", "2"], overrides=["data.global_batch=256", "data.micro_batch=16"], nproc=2,
             dry_run=True)
    assert isinstance(p.target, Torchrun) and p.command == p.target.command
    assert "2 process(es) × micro batch 16 × accumulation 8 = global batch 256" in p.summary


def test_dry_run_of_the_18b_recipe_on_45_nodes():
    p = make(["train", "--recipe", "18b", "--nproc", "8", "--nodes", "45", "--master-addr", "10.1.2.3"],
             recipe="18b", nproc=8, nodes=45, master_addr="10.1.2.3", dry_run=True, port=no_port)
    assert " ".join(p.command).startswith("torchrun --nproc_per_node=8 --nnodes=45")
    assert "360 process(es) × micro batch 150 × accumulation 2 = global batch 108000" in p.summary


def test_dry_run_title_names_the_command():
    p = make(["finetune-video"], stage="video", recipe="video-tiny", dry_run=True)
    assert p.title == "evaclip finetune-video --recipe video-tiny (dry run)"


def test_batch_not_divisible_by_processes_is_a_user_error():
    with pytest.raises(UserError, match="not a multiple"):
        make(["train"], nproc=3, port=no_port)  # tiny: global batch 64


# ------------------------------------------------------------------------------------------------ stage check
@pytest.mark.parametrize("stage,recipe,command", [("train", "distill-18b", "distill"), ("video", "tiny", "train"),
                                                  ("distill", "video-tiny", "finetune-video")])
def test_a_recipe_of_another_stage_is_a_user_error(stage, recipe, command):
    with pytest.raises(UserError, match=f"'{recipe}' is a .* recipe; run it with `evaclip {command} ...`"):
        make([stage], stage=stage, recipe=recipe, port=no_port)


def test_bad_launcher_name():
    with pytest.raises(ValueError):
        LaunchOptions(launcher="mpirun")


# ---------------------------------------------------------------------------------------------------- argv
def test_strip_launch_args():
    argv = ["train", "--recipe", "tiny", "--nproc", "2", "--nodes=3", "--node-rank", "1", "--master-addr", "h",
            "--master-port=9", "--hostfile", "hf", "--launcher", "torchrun", "--dry-run", "-o", "out",
            "--resume", "auto", "optimizer.lr=1e-3"]
    assert launch.strip_launch_args(argv) == ["train", "--recipe", "tiny", "-o", "out", "--resume", "auto",
                                              "optimizer.lr=1e-3"]


# ------------------------------------------------------------------------------------------------------- eval
def test_eval_plans():
    argv = ["eval", "zeroshot", "-m", "m", "-d", "d", "--nproc", "2"]
    p = plan_eval(2, argv, environ={}, free_port=lambda: 7, python=PY)
    assert p.args[:4] == ("--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1", "--master_port=7")
    assert p.args[-7:] == ("evaclip_cli.cli", "eval", "zeroshot", "-m", "m", "-d", "d")
    assert plan_eval(2, argv, environ={"LOCAL_RANK": "1"}, free_port=no_port) == RunHere()
    assert plan_eval(1, argv, environ={}, free_port=no_port) == RunHere()


# ----------------------------------------------------------------------------------------------------- execute
def test_execute_writes_the_sbatch_script(tmp_path, capsys):
    p = Sbatch(tmp_path / "run" / "launch.sbatch", "#!/bin/bash\necho hi\n")
    assert launch.execute(p) == 0
    assert p.path.read_text() == p.script
    assert f"wrote {p.path}" in " ".join(capsys.readouterr().out.split())


def test_execute_refuses_run_here():
    with pytest.raises(TypeError):
        launch.execute(RunHere())


def test_planning_is_light_and_pure(tmp_path):
    """Planning every kind imports no torch and starts, binds and writes nothing (cwd stays empty)."""
    code = "\n".join([
        "import json, sys, socket",
        "import evaclip_entry; evaclip_entry.COMMAND_LINE = True  # as the console script: no open_clip integration",
        "from pathlib import Path",
        "socket.socket = None  # any port binding would fail",
        "from evaclip_cli.engine.launch import LaunchOptions, plan",
        "from evaclip_cli.recipes import load_recipe",
        "r = load_recipe('18b').recipe",
        "for o in [dict(), dict(nproc=8, nodes=45, master_addr='h'), dict(launcher='slurm'),",
        "          dict(launcher='slurm', dry_run=True), dict(nproc=8, master_port=5, dry_run=True)]:",
        "    plan('train', r, LaunchOptions(**o), ['train'], recipe_ref='18b', under_launcher=False,",
        "         free_port=lambda: 1)",
        "print(json.dumps([m for m in ('torch', 'deepspeed', 'subprocess') if m in sys.modules]))",
    ])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------- the CLI's use of it
def test_cli_hands_the_command_line_to_the_planner(capsys):
    """The dry run prints the command line as typed (the children re-run it), launcher options stripped."""
    from conftest import run_cli

    code, out, err = run_cli(["distill", "--teacher", "t/x", "--dry-run", "--nproc", "2", "--master-port", "99",
                              "-o", "runs/d", "data.micro_batch=32"], capsys)
    assert code == 0, err
    assert (f"--master_port=99 --no-python {sys.executable} -m evaclip_cli.cli distill --teacher t/x -o runs/d "
            "data.micro_batch=32"
            in " ".join(out.split()))
    assert 'teacher = "t/x"' in out  # --teacher folded into the recipe


def test_cli_typer_runner_also_carries_the_command_line():
    from typer.testing import CliRunner

    from evaclip_cli.cli import app

    res = CliRunner().invoke(app, ["train", "--dry-run", "optimizer.lr=0.25"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "evaclip train --dry-run optimizer.lr=0.25" not in res.output  # --dry-run stripped
    assert "evaclip train optimizer.lr=0.25" in res.output


def test_cli_writes_sbatch_into_the_run_folder(tmp_path, capsys):
    from conftest import run_cli

    out_dir = tmp_path / "run"
    code, out, err = run_cli(["train", "--recipe", "18b", "--launcher", "slurm", "--nodes", "2", "--nproc", "4",
                              "--out", out_dir], capsys)
    assert code == 0, err
    script = (out_dir / "launch.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and f"--output={out_dir}/slurm-%j.out" in script
    assert f"-m evaclip_cli.cli train --recipe 18b --out {out_dir} --resume auto" in script
    assert "sbatch" in out


def test_cli_user_errors_print_nothing_on_stdout(capsys):
    from conftest import run_cli

    code, out, err = run_cli(["train", "--recipe", "18b", "--dry-run", "--nodes", "2"], capsys)
    assert (code, out) == (2, "") and err.startswith("evaclip: error: --nodes > 1 needs --master-addr")
    code, out, err = run_cli(["finetune-video", "--recipe", "tiny", "--dry-run"], capsys)
    assert (code, out) == (2, "") and "run it with `evaclip train ...`" in err


# ------------------------------------------------------------------------------------- the sbatch script's requeue
SLURM_STANDIN = Path(__file__).parent / "helpers" / "slurm"


def _run_script(tmp_path, srun_body: str, restarts: str, signal_after_start: bool = False):
    """The written sbatch script under bash with a stand-in `srun` (``srun_body``: a sh script) and the stand-in
    scontrol; returns (exit code, stderr, requeued job ids)."""
    import os
    import signal
    import time

    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text("#!/bin/sh\n" + srun_body)
    (bin_dir / "srun").chmod(0o755)
    script = launch.slurm_script("t", 1, 1, run, ["train"], python=sys.executable, max_requeues=20)
    log = tmp_path / "requeued"
    env = {**os.environ, "PATH": f"{bin_dir}:{SLURM_STANDIN}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_RESTART_COUNT": restarts, "SLURM_REQUEUE_LOG": str(log),
           "RUN_DIR": str(run)}
    p = subprocess.Popen(["bash", "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    if signal_after_start:
        time.sleep(1)
        p.send_signal(signal.SIGUSR1)  # slurm's warning: to the batch shell only
    err = p.communicate(timeout=60)[1]
    return p.returncode, err, log.read_text().split() if log.exists() else []


@pytest.mark.parametrize("code,restarts,requeued", [(75, "0", ["7"]), (75, "19", ["7"]), (75, "20", []),
                                                     (1, "0", []), (0, "0", [])])
def test_the_sbatch_script_requeues_a_graceful_stop_only_and_at_most_max_requeues(tmp_path, code, restarts,
                                                                                    requeued):
    rc, err, ids = _run_script(tmp_path, f"exit {code}\n", restarts)
    assert rc == code and ids == requeued, err
    if code == 75 and not requeued:
        assert "not requeued: already restarted 20 times (compute.max_requeues)" in err


def test_the_sbatch_script_turns_slurms_warning_into_a_stop_request_and_waits_for_the_step(tmp_path):
    # the step ends (exit 75) only once the run folder holds STOP, as the training loop does
    body = 'while [ ! -e "$RUN_DIR/STOP" ]; do sleep 0.05; done\nsleep 0.5\nexit 75\n'
    rc, err, ids = _run_script(tmp_path, body, "0", signal_after_start=True)
    assert rc == 75 and ids == ["7"], err
    assert "the run stops after the current step" in err
    assert "job 7 (SIGUSR1)" in (tmp_path / "run" / "STOP").read_text()


def test_the_sbatch_script_sets_the_warning_lead_and_requeue_from_the_recipe():
    r = load_recipe("tiny", ["compute.stop_lead_s=900", "compute.max_requeues=3"]).recipe
    p = launch.plan("train", r, launch.LaunchOptions(launcher="slurm"), ["train"], recipe_ref="tiny",
                    under_launcher=False, free_port=lambda: 1)
    assert "#SBATCH --signal=B:USR1@900" in p.script and "MAX_REQUEUES=3" in p.script
    assert "#SBATCH --requeue" in p.script and f"{sys.executable} -m evaclip_cli.engine.launch" in p.script


def test_deepspeed_runs_from_this_interpreter_and_a_missing_pdsh_is_one_line(tmp_path):
    assert launch.deepspeed_runner_argv(("deepspeed", "--hostfile", "h", "--module", "m"))[:4] == \
        [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    hf = tmp_path / "hosts"
    hf.write_text("node1 slots=8\nnode2 slots=8\n")
    with pytest.raises(UserError, match=r"names other hosts \(node1, node2\).* pdsh and ssh are not installed here; "
                                        r"install it \(apt install pdsh"):
        launch.check_multi_host(hf, which=lambda tool: None)
    launch.check_multi_host(hf, which=lambda tool: f"/usr/bin/{tool}")  # installed: no complaint
    hf.write_text("localhost slots=2\n")
    launch.check_multi_host(hf, which=lambda tool: None)  # this machine only: no ssh needed


def test_the_job_exit_code_is_a_ranks_own_before_the_signals_the_agent_sent():
    assert launch.exit_code_of([-15, 75]) == 75  # rank 1 stopped (75); the agent then ended rank 0 (SIGTERM)
    assert launch.exit_code_of([3, 75]) == 3
    assert launch.exit_code_of([-9, None]) == 137 and launch.exit_code_of([None]) == 1
