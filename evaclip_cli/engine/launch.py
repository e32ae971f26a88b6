"""Launching a stage: in this process, on N local processes (torchrun), on many nodes (DeepSpeed's launcher with a
hostfile, or torchrun per node), or as a Slurm batch script.

``plan`` decides and does nothing: it reads no environment variable, binds no port, writes no file and starts no
process; whatever it needs from outside (is this process already a launcher's rank? which port is free?) is passed
in. ``execute`` carries a plan out. The CLI's ``train``, ``distill`` and ``finetune-video`` all go through both, and
the ``eval`` commands through ``plan_eval``.

The child processes run ``python -m evaclip_cli.cli <stage> ...`` with the same arguments minus the launcher ones,
so every rank parses the same recipe and overrides.
"""
from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from evaclip_cli.engine.config import accumulation_steps
from evaclip_cli.errors import UserError

if TYPE_CHECKING:
    from evaclip_cli.recipes import Recipe

LAUNCH_FLAGS_WITH_VALUE = ("--nproc", "--nodes", "--node-rank", "--master-addr", "--master-port", "--hostfile",
                           "--launcher")
LAUNCH_FLAGS_BOOL = ("--dry-run",)
LAUNCHERS = ("torchrun", "deepspeed", "slurm")
STAGE_COMMANDS = {"train": "train", "distill": "distill", "video": "finetune-video"}  # recipe stage -> command
DEFAULT_PORT = 29500  # multi-node rendezvous port when --master-port is not given


# ------------------------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class LaunchOptions:
    """The launcher options of a training command, as parsed (``--nproc`` ... ``--dry-run``)."""

    nproc: int = 1
    nodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    hostfile: Optional[Path] = None
    launcher: Optional[str] = None  # one of LAUNCHERS; None: torchrun when more than one process
    dry_run: bool = False

    def __post_init__(self):
        if self.launcher is not None and self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher {self.launcher!r} is not one of {', '.join(LAUNCHERS)}")

    @property
    def world(self) -> int:
        return self.nproc * self.nodes


# -------------------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class RunHere:
    """Run in this process: a single process, or one rank a launcher already started."""

    out_dir: Optional[Path] = None


@dataclass(frozen=True)
class Torchrun:
    """Re-run this command on N processes per node with ``torch.distributed.run`` (``args``: its arguments).
    ``out_dir``: the run folder of a training run (the stop request and the last checkpoint named at Ctrl-C);
    ``stop_signals``: the recipe's ``compute.stop_signals``, which the launcher turns into a stop request."""

    args: tuple[str, ...]
    out_dir: Optional[Path] = None
    stop_signals: tuple[str, ...] = ()

    @property
    def command(self) -> tuple[str, ...]:
        return ("torchrun", *self.args)


@dataclass(frozen=True)
class DeepSpeedLauncher:
    """Start DeepSpeed's launcher on every host of a hostfile (``command``: the whole command line as a user would
    type it; ``execute`` runs it as ``deepspeed.launcher.runner`` of this interpreter, not a ``deepspeed`` from
    PATH). ``out_dir`` and ``stop_signals`` as for ``Torchrun``."""

    command: tuple[str, ...]
    out_dir: Optional[Path] = None
    stop_signals: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sbatch:
    """Write a Slurm batch script to ``path`` (the user submits it)."""

    path: Path
    script: str


@dataclass(frozen=True)
class DryRun:
    """Print what ``target`` would do, run nothing: the resolved recipe, the command and the batch arithmetic
    (for a batch script: the script itself)."""

    target: Union[RunHere, Torchrun, DeepSpeedLauncher, Sbatch]
    title: str = ""
    recipe_toml: str = ""
    command: tuple[str, ...] = ()
    summary: str = ""
    world: int = 1  # the processes the target would start


Plan = Union[RunHere, Torchrun, DeepSpeedLauncher, Sbatch, DryRun]


# ------------------------------------------------------------------------------------------- argument builders
def under_launcher(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` is that of a rank a launcher started (torchrun/deepspeed: LOCAL_RANK; mpirun)."""
    return "LOCAL_RANK" in environ or "OMPI_COMM_WORLD_RANK" in environ


def strip_launch_args(argv: Sequence[str]) -> list[str]:
    """``argv`` without the launcher options (``--nproc 2``, ``--master-port=1234``, ``--dry-run`` ...): what every
    rank runs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in LAUNCH_FLAGS_WITH_VALUE:
            skip = "=" not in a
            continue
        if name in LAUNCH_FLAGS_BOOL:
            continue
        out.append(a)
    return out


def child_argv(stage_argv: Sequence[str]) -> list[str]:
    return ["-m", "evaclip_cli.cli", *strip_launch_args(stage_argv)]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (binds a socket: pass it to ``plan``, never call it there)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_args(nproc: int, nodes: int, node_rank: int, master_addr: Optional[str], master_port: Optional[int],
                  stage_argv: Sequence[str], free_port: Callable[[], int] = free_port,
                  python: str = sys.executable) -> list[str]:
    """Arguments of ``torch.distributed.run`` for this command on ``nproc`` processes per node. ``free_port`` is
    called for a single node without ``master_port`` only."""
    args = [f"--nproc_per_node={nproc}", f"--nnodes={nodes}"]
    if nodes > 1:
        if not master_addr:
            raise UserError("--nodes > 1 needs --master-addr (the address of node 0) and --node-rank")
        args += [f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                 f"--master_port={master_port or DEFAULT_PORT}"]
    else:
        args += ["--master_addr=127.0.0.1", f"--master_port={master_port or free_port()}"]
    return [*args, "--no-python", python, *child_argv(stage_argv)]


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def hostfile_slots(hostfile: Path) -> dict[str, int]:
    """Host -> slots of a DeepSpeed hostfile ('host slots=N' lines, '#' comments; no slots= means 1)."""
    out: dict[str, int] = {}
    for line in hostfile.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        slots = next((f.split("=", 1)[1] for f in fields[1:] if f.startswith("slots=")), "1")
        if not slots.isdigit() or int(slots) < 1:
            raise UserError(f"--hostfile {hostfile}: '{line.strip()}' has no valid slots=N")
        out[fields[0]] = int(slots)
    return out


def deepspeed_args(hostfile: Path, nproc: Optional[int], master_addr: Optional[str],
                   stage_argv: Sequence[str], master_port: Optional[int] = None,
                   local_names: Sequence[str] = LOCAL_HOSTS) -> list[str]:
    """DeepSpeed's launcher command for a hostfile (which must exist). The hostfile's slots set the processes per
    host unless ``--nproc`` asks for more than one; a hostfile naming only this machine (``local_names``) needs no
    ssh, so DeepSpeed's ssh check is skipped and the master is 127.0.0.1."""
    if not hostfile.is_file():
        raise UserError(f"--hostfile {hostfile}: no such file (lines like 'node1 slots=8')")
    hosts = list(hostfile_slots(hostfile))
    if not hosts:
        raise UserError(f"--hostfile {hostfile}: no host listed (lines like 'node1 slots=8')")
    args = ["deepspeed", "--hostfile", str(hostfile), "--no_local_rank"]
    if nproc and nproc > 1:
        args += ["--num_gpus", str(nproc)]
    if all(h in local_names for h in hosts):
        args.append("--no_ssh_check")
        master_addr = master_addr or "127.0.0.1"
    if master_addr:
        args += ["--master_addr", master_addr]
    if master_port:
        args += ["--master_port", str(master_port)]
    return [*args, "--module", "evaclip_cli.cli", *strip_launch_args(stage_argv)]


def slurm_script(job: str, nodes: int, nproc: int, out_dir: Path, stage_argv: Sequence[str],
                 time_limit: str = "72:00:00", python: str = sys.executable, stop_lead_s: int = 600,
                 max_requeues: int = 20) -> str:
    """The sbatch script of a job: one agent per node (``run_torchrun`` of this interpreter, c10d rendezvous), run in
    the background while the script waits. Slurm sends the script SIGUSR1 ``stop_lead_s`` seconds before the time
    limit; its trap asks the run to stop (``RUN/STOP``, on the shared file system): every rank finishes the same
    step, writes a checkpoint and exits with 75, and the script then requeues the job (``scontrol requeue``, at most
    ``max_requeues`` times: ``SLURM_RESTART_COUNT``), which continues with ``--resume auto``. Any other exit code
    ends the job with that code."""
    child = " ".join(shlex.quote(a) for a in [python, *child_argv(stage_argv)])
    run = shlex.quote(str(out_dir))
    return f"""#!/bin/bash
#SBATCH --job-name={job}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={nproc}
#SBATCH --cpus-per-task={max(8, 8 * nproc)}
#SBATCH --time={time_limit}
#SBATCH --output={out_dir}/slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@{stop_lead_s}
#SBATCH --requeue
# written by evaclip; submit with: sbatch {out_dir}/launch.sbatch
# {stop_lead_s} s before the time limit slurm sends this script USR1 (compute.stop_lead_s): it asks the run to stop
# after the current step (RUN/STOP), every rank writes the checkpoint of that step and exits with 75, and the job is
# requeued (at most {max_requeues} times: compute.max_requeues) to go on with --resume auto. Other codes end the job.
set -uo pipefail
RUN={run}
MAX_REQUEUES={max_requeues}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${{MASTER_PORT:-29500}}
stop_run() {{
  echo "evaclip: slurm's warning before the time limit (USR1): the run stops after the current step" >&2
  date -u "+asked by the batch script of job $SLURM_JOB_ID (SIGUSR1) at %F %T UTC" > "$RUN/STOP"
}}
trap stop_run USR1
srun --kill-on-bad-exit=1 {shlex.quote(python)} -m evaclip_cli.engine.launch \\
  --nnodes={nodes} --nproc_per_node={nproc} \\
  --rdzv_backend=c10d --rdzv_id=$SLURM_JOB_ID --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT \\
  --no-python {child} --resume auto &
step=$!
while true; do
  wait "$step"
  code=$?
  kill -0 "$step" 2>/dev/null || break  # a trapped USR1 ends `wait` early: the step still runs
done
if [ "$code" -eq 75 ]; then
  if [ "${{SLURM_RESTART_COUNT:-0}}" -lt "$MAX_REQUEUES" ]; then
    echo "evaclip: stopped with a checkpoint (exit 75); requeueing job $SLURM_JOB_ID" \\
      "(restart $(( ${{SLURM_RESTART_COUNT:-0}} + 1 )) of at most $MAX_REQUEUES)" >&2
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "evaclip: stopped with a checkpoint (exit 75); not requeued: already restarted $MAX_REQUEUES times" \\
      "(compute.max_requeues); submit this script again to continue" >&2
  fi
fi
exit "$code"
"""


# -------------------------------------------------------------------------------------------------------- plan
def check_stage(stage: str, recipe_stage: str, recipe_ref: str) -> None:
    """A recipe runs with its own stage's command only."""
    if stage != recipe_stage:
        raise UserError(f"recipe '{recipe_ref}' is a '{recipe_stage}' recipe; run it with `evaclip "
                        f"{STAGE_COMMANDS[recipe_stage]} ...`")


def plan(stage: str, recipe: Recipe, opts: LaunchOptions, argv: Sequence[str], *, recipe_ref: str,
         out: Optional[Path] = None, under_launcher: bool, free_port: Callable[[], int],
         python: str = sys.executable) -> Plan:
    """How to run training stage ``stage`` ('train', 'distill' or 'video') of the resolved ``recipe``.

    ``argv`` is this command line (command name first, as typed after ``evaclip``): what the children re-run,
    minus the launcher options. ``recipe_ref`` is the recipe as the user named it (messages, dry-run title);
    ``out`` the ``--out`` folder, if given. ``under_launcher``: this process is a rank a launcher started (then
    it runs here, whatever the options). ``free_port`` picks the rendezvous port of a single-node torchrun that
    has no ``--master-port``.

    Precedence: ``--launcher slurm``; then ``--dry-run``; then under a launcher -> run here; then ``--launcher
    deepspeed`` or ``--hostfile`` -> DeepSpeed's launcher; more than one process -> torchrun; else run here.
    Raises UserError for a recipe of another stage, a global batch the processes cannot split, ``--nodes > 1``
    without ``--master-addr``, or a hostfile that does not exist.
    """
    check_stage(stage, recipe.stage, recipe_ref)
    out_dir = Path(out) if out else recipe.out_dir()
    argv = list(argv)
    world = opts.world
    if opts.hostfile and Path(opts.hostfile).is_file():  # DeepSpeed's launcher: the hostfile's slots are the ranks
        slots = hostfile_slots(Path(opts.hostfile))
        world = opts.nproc * len(slots) if opts.nproc > 1 else sum(slots.values())
    accum = accumulation_steps(recipe.data.global_batch, recipe.data.micro_batch, world)
    if opts.launcher == "slurm":
        sbatch = Sbatch(out_dir / "launch.sbatch", slurm_script(recipe.name, opts.nodes, opts.nproc, out_dir, argv,
                                                                python=python, stop_lead_s=recipe.compute.stop_lead_s,
                                                                max_requeues=recipe.compute.max_requeues))
        return DryRun(sbatch, world=world) if opts.dry_run else sbatch
    if not opts.dry_run and under_launcher:
        return RunHere(out_dir)
    target: Union[RunHere, Torchrun, DeepSpeedLauncher]
    if opts.launcher == "deepspeed" or opts.hostfile:
        target = DeepSpeedLauncher(tuple(deepspeed_args(Path(opts.hostfile) if opts.hostfile else Path("hostfile"),
                                                        opts.nproc, opts.master_addr, argv, opts.master_port)),
                                   out_dir=out_dir, stop_signals=tuple(recipe.compute.stop_signals))
        command = target.command
    elif world > 1:
        target = Torchrun(tuple(torchrun_args(opts.nproc, opts.nodes, opts.node_rank, opts.master_addr,
                                              opts.master_port, argv, free_port=free_port, python=python)),
                          out_dir=out_dir, stop_signals=tuple(recipe.compute.stop_signals))
        command = target.command
    else:
        target = RunHere(out_dir)
        command = ("evaclip", *strip_launch_args(argv))
    if not opts.dry_run:
        return target
    from evaclip_cli.recipes import recipe_to_toml

    return DryRun(target, title=f"evaclip {STAGE_COMMANDS[stage]} --recipe {recipe_ref} (dry run)",
                  recipe_toml=recipe_to_toml(recipe), command=tuple(command),
                  summary=f"{world} process(es) × micro batch {recipe.data.micro_batch} × accumulation {accum} = "
                          f"global batch {recipe.data.global_batch}; {recipe.steps:,} steps; output {out_dir}",
                  world=world)


def plan_eval(nproc: int, argv: Sequence[str], *, environ: Mapping[str, str], free_port: Callable[[], int],
              python: str = sys.executable) -> Union[RunHere, Torchrun]:
    """An eval command: data-parallel on ``nproc`` local processes (torchrun) unless this already is a rank."""
    if nproc > 1 and "LOCAL_RANK" not in environ:
        return Torchrun(tuple(torchrun_args(nproc, 1, 0, None, None, argv, free_port=free_port, python=python)))
    return RunHere()


# ----------------------------------------------------------------------------------------------------- execute
def execute(p: Plan) -> int:
    """Carry out a plan other than RunHere (which the caller runs itself): print, write or launch. Returns the
    exit code (of the launcher, for Torchrun and DeepSpeedLauncher)."""
    if isinstance(p, RunHere):
        raise TypeError("RunHere is run by the caller, in this process")
    if isinstance(p, Torchrun):
        return run_torchrun(list(p.args), p.out_dir, p.stop_signals)
    if isinstance(p, DeepSpeedLauncher):
        return run_deepspeed(p)
    from rich.console import Console

    console = Console()
    if isinstance(p, Sbatch):
        p.path.parent.mkdir(parents=True, exist_ok=True)
        p.path.write_text(p.script)
        console.print(f"wrote {p.path}: submit it with [bold]sbatch {p.path}[/bold]", soft_wrap=True)
        return 0
    if isinstance(p, DryRun):
        if isinstance(p.target, Sbatch):
            print(p.target.script, flush=True)
            return 0
        console.rule(p.title)
        print(p.recipe_toml, end="", flush=True)
        console.rule()
        print(shlex.join(p.command), flush=True)
        console.print(p.summary)
        return 0
    raise TypeError(f"not a launch plan: {p!r}")


SHUTDOWN_S = 5  # seconds the agent waits after Ctrl-C forwarded before it kills what is left of the job (SIGKILL)
FAST_STOP = ("SIGINT", "SIGHUP", "SIGQUIT")  # end every process of the job now (Ctrl-C, a lost terminal)


def last_checkpoint_line(out_dir: Optional[Path]) -> str:
    """What a stopped job leaves to continue from: the last complete checkpoint of ``out_dir``."""
    if out_dir is None:
        return ""
    from evaclip_cli.engine.resume import list_complete

    done = list_complete(Path(out_dir) / "checkpoints")
    if not done:
        return f"; no checkpoint was written yet in {out_dir}"
    step, path = done[-1]
    return f"; the last complete checkpoint is {path} (step {step}): continue with --resume auto"


def request_stop(out_dir: Path, why: str) -> Path:
    """Ask the run training in ``out_dir`` to stop gracefully (``RUN/STOP``: every rank finishes the current step,
    a checkpoint is written, exit code 75)."""
    from evaclip_cli import atomic

    return atomic.write_text(Path(out_dir) / "STOP", why + "\n")


def _stop_handlers(out_dir: Optional[Path], stop_signals: Sequence[str]) -> dict[int, object]:
    """Install the launcher's own signal handlers; returns the previous ones. A stop signal of the recipe (not
    Ctrl-C) becomes a stop request for the whole job; SIGUSR1 otherwise is ignored (inherited by the children), so a
    SIGUSR1 sent to the whole job never kills a launcher or an agent."""
    import signal

    previous: dict[int, object] = {}

    def on_stop(signum, frame):
        name = signal.Signals(signum).name
        assert out_dir is not None
        request_stop(out_dir, f"{name} to the launcher (pid {os.getpid()})")
        print(f"evaclip: {name}: the job stops after the current step with a checkpoint (exit code 75)",
              file=sys.stderr, flush=True)

    ours = {n for n in stop_signals if n not in FAST_STOP} if out_dir is not None else set()
    for name in ours | {"SIGUSR1"}:
        sig = getattr(signal, name)
        previous[sig] = signal.signal(sig, on_stop if name in ours else signal.SIG_IGN)
    return previous


def _restore(previous: dict[int, object]) -> None:
    import signal

    for sig, handler in previous.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]


def _interrupted_line(signum: int, out_dir: Optional[Path]) -> str:
    import signal

    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    return f"evaclip: interrupted ({name}): every process of the job has stopped{last_checkpoint_line(out_dir)}"


def run_torchrun(args: list[str], out_dir: Optional[Path] = None, stop_signals: Sequence[str] = ()) -> int:
    """torchrun in this process; the exit code of the first failed rank. The workers print their own one line, so
    the agent's failure log is silenced (EVACLIP_DEBUG=1 keeps it); a rank ended by a signal gets a line here.

    The ranks end with this process (``evaclip_cli/lifeline.py``). Ctrl-C (SIGINT, SIGHUP, SIGQUIT) reaches the agent,
    which forwards it to every rank's process group and kills what is left after ``SHUTDOWN_S``; one line then names
    the last complete checkpoint (exit code 128 + the signal). A stop signal of the recipe becomes a graceful stop
    of the whole job (``request_stop``); SIGUSR1 is ignored otherwise."""
    import logging
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    from evaclip_cli.lifeline import launcher_env

    if not os.environ.get("EVACLIP_DEBUG"):  # torch gives each of its loggers a level of its own
        for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    previous = _stop_handlers(out_dir, stop_signals)
    # the agent forwards these to every rank (then kills what is left); a SIGTERM the launcher turns into a stop
    # request is not among them
    forwarded = [*FAST_STOP, *([] if out_dir is not None and "SIGTERM" in stop_signals else ["SIGTERM"])]
    os.environ.update(launcher_env())  # the ranks watch this process (the agent's environment is theirs)
    try:
        torchrun_main([f"--signals-to-handle={','.join(forwarded)}", f"--shutdown-timeout={SHUTDOWN_S}", *args])
    except SignalException as e:  # every rank's process group has ended (SIGKILL after SHUTDOWN_S at the latest)
        print(_interrupted_line(int(e.sigval), out_dir), file=sys.stderr, flush=True)
        sys.stdout.flush()
        # nothing is left to do here, and the agent's native teardown (its rendezvous store) takes seconds more
        os._exit(128 + int(e.sigval))
    except ChildFailedError as e:
        codes = []
        for rank, f in sorted(e.failures.items()):
            codes.append(f.exitcode)
            if f.exitcode is not None and f.exitcode < 0 and -f.exitcode != signal.SIGTERM:
                try:
                    name = signal.Signals(-f.exitcode).name
                except ValueError:
                    name = f"signal {-f.exitcode}"
                print(f"evaclip: rank {rank} (pid {f.pid}) was ended by {name}", file=sys.stderr)
        return exit_code_of(codes)
    finally:
        _restore(previous)
    return 0


def exit_code_of(codes: Sequence[Optional[int]]) -> int:
    """The job's exit code from its ranks' (in rank order): the first a rank exited with itself (75 for a graceful
    stop, though the agent then ends the ranks still exiting with a signal), else 128 + the first signal."""
    own = [c for c in codes if c is not None and c > 0]
    if own:
        return own[0]
    signalled = [c for c in codes if c is not None and c < 0]
    return 128 - signalled[0] if signalled else 1


def check_multi_host(hostfile: Path, which: Callable[[str], Optional[str]], local_names: Sequence[str] = LOCAL_HOSTS
                     ) -> None:
    """A hostfile naming other hosts: DeepSpeed's launcher reaches them with pdsh over ssh, which must be installed
    here (one line saying what to install otherwise)."""
    hosts = [h for h in hostfile_slots(hostfile) if h not in local_names]
    if not hosts:
        return
    missing = [tool for tool in ("pdsh", "ssh") if which(tool) is None]
    if missing:
        more = f" and {len(hosts) - 3} more" if len(hosts) > 3 else ""
        raise UserError(f"--hostfile {hostfile} names other hosts ({', '.join(hosts[:3])}{more}): DeepSpeed's "
                        f"launcher reaches them with pdsh over ssh, and {' and '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not installed here; install it (apt install pdsh "
                        "openssh-client), or start `evaclip train --nodes N "
                        "--node-rank K --master-addr HOST` on each node")


def deepspeed_runner_argv(command: Sequence[str], python: str = sys.executable) -> list[str]:
    """DeepSpeed's launcher as this interpreter's module (its launch.py per node and the ranks then use this
    interpreter too), whatever ``deepspeed`` PATH holds or lacks."""
    return [python, "-u", "-m", "deepspeed.launcher.runner", *command[1:]]


def run_deepspeed(p: DeepSpeedLauncher) -> int:
    """DeepSpeed's launcher, started from this interpreter; it ends with this process (the parent-death signal,
    SIGTERM: its pdsh runner then ends the remote side) and the ranks watch this process. Ctrl-C reaches the whole
    foreground group (runner, launch.py, ranks); one line then names the last complete checkpoint."""
    import shutil
    import signal
    import subprocess

    from evaclip_cli.lifeline import launcher_env, preexec_die_with_parent

    hostfile = Path(p.command[p.command.index("--hostfile") + 1]) if "--hostfile" in p.command else None
    if hostfile is not None:
        check_multi_host(hostfile, shutil.which)
    previous = _stop_handlers(p.out_dir, p.stop_signals)
    try:
        proc = subprocess.Popen(deepspeed_runner_argv(p.command), env={**os.environ, **launcher_env()},
                                preexec_fn=preexec_die_with_parent(signal.SIGTERM))
        try:
            return proc.wait()
        except KeyboardInterrupt:
            try:
                proc.wait(timeout=SHUTDOWN_S + 3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            print(_interrupted_line(signal.SIGINT, p.out_dir), file=sys.stderr, flush=True)
            return 128 + signal.SIGINT
    finally:
        _restore(previous)


if __name__ == "__main__":  # the agent of one node in the sbatch script: torchrun's arguments, the ranks' exit code
    sys.exit(run_torchrun(sys.argv[1:]))
