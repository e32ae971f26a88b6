"""The ``evaclip`` Typer app, assembled: the groups, every command of the ``cmd_*`` modules in the order of
``evaclip --help``, the root callback, and ``main()`` with its one-line error contract.

The command modules only define functions (options from ``cli/options.py``); this module alone registers them,
so nothing in ``cli/`` imports back from here.
"""
from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from evaclip_cli import __version__
from evaclip_cli.cli import (
    cmd_convert,
    cmd_data,
    cmd_demo,
    cmd_embed,
    cmd_estimate,
    cmd_eval,
    cmd_predict,
    cmd_push,
    cmd_recipes,
    cmd_status,
    cmd_train,
)
from evaclip_cli.cli.invocation import RootGroup, is_rank0
from evaclip_cli.errors import Interrupted, StopRequested, TrainingStopped, UserError

app = typer.Typer(
    name="evaclip",
    cls=RootGroup,
    help="The EVA-CLIP-18B lifecycle in one tool: weak-to-strong MIM distillation, DeepSpeed CLIP training, the video "
    "stage, checkpoint conversion, zero-shot evaluation and publishing to the Hub. `evaclip demo` runs it all on "
    "the embedded demo data.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipes_app = typer.Typer(help="List, show and copy the shipped recipes.", no_args_is_help=True)
data_app = typer.Typer(help="Make and inspect datasets.", no_args_is_help=True)
eval_app = typer.Typer(help="Zero-shot evaluation with CLIP_benchmark's protocol and metric names: image "
                       "classification, retrieval, video, and whole benchmark suites.", no_args_is_help=True)

COMMANDS = (  # (group, command name, function)
    (app, "estimate", cmd_estimate.estimate),
    (app, "train", cmd_train.train),
    (app, "distill", cmd_train.distill),
    (app, "convert", cmd_convert.convert),
    (app, "demo", cmd_demo.demo),
    (app, "finetune-video", cmd_train.finetune_video),
    (app, "push", cmd_push.push),
    (app, "status", cmd_status.status),
    (app, "predict", cmd_predict.predict),
    (app, "embed", cmd_embed.embed),
    (recipes_app, "ls", cmd_recipes.ls),
    (recipes_app, "show", cmd_recipes.show),
    (recipes_app, "cp", cmd_recipes.cp),
    (data_app, "make-demo", cmd_data.make_demo),
    (data_app, "inspect", cmd_data.inspect),
    (eval_app, "zeroshot", cmd_eval.zeroshot),
    (eval_app, "retrieval", cmd_eval.retrieval),
    (eval_app, "suite", cmd_eval.suite),
    (eval_app, "video", cmd_eval.video),
)
for _group, _name, _function in COMMANDS:
    _group.command(_name)(_function)
app.add_typer(recipes_app, name="recipes")
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")


def _version(value: bool):
    if value:
        typer.echo(f"evaclip {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version.")] = False,
):
    pass


def main(argv: Optional[list] = None) -> int:
    """Console entry point. Exit codes: 0 ok; 2 a user error or a write refused (full disk, quota, read-only; one
    line on stderr); 3 a run that had to stop (one
    line); 75 a graceful stop by signal or RUN/STOP, its checkpoint written (continue with --resume auto); 1 an
    internal error (one line, the traceback with EVACLIP_DEBUG=1); 130 interrupted (Ctrl-C)."""
    args = list(map(str, argv)) if argv is not None else sys.argv[1:]
    try:
        app(args=args, standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except UserError as e:
        if is_rank0(os.environ):
            print(f"evaclip: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if "LOCAL_RANK" not in os.environ:  # a rank's launcher prints the one line (engine/launch.py)
            print("evaclip: interrupted", file=sys.stderr)
        return 130
    except StopRequested as e:  # SIGTERM/SIGUSR1: stopped at a step boundary with its checkpoint written
        if is_rank0(os.environ):
            print(f"evaclip: {e}", file=sys.stderr)
        return e.exit_code
    except TrainingStopped as e:  # a run that cannot go on: one line, exit code 3
        if isinstance(e, Interrupted) and "LOCAL_RANK" in os.environ:  # Ctrl-C: the launcher prints the line
            return e.exit_code
        if is_rank0(os.environ) or (e.every_node and os.environ.get("LOCAL_RANK", "0") == "0"):
            print(f"evaclip: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        line = _write_failure_line(e) if isinstance(e, OSError) else None
        if line is not None:  # a full disk, a quota, a read-only folder that no writer named: still one line
            if is_rank0(os.environ):
                print(line, file=sys.stderr)
            return UserError.exit_code
        if os.environ.get("EVACLIP_DEBUG"):  # an evaclip bug, not bad input: one line, traceback on request
            raise
        print(f"evaclip: internal error: {type(e).__name__}: {e} (set EVACLIP_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    return 0


def _write_failure_line(e: OSError) -> Optional[str]:
    """The one line of a write no writer turned into a UserError (a full disk, a quota, a read-only folder), None
    for any other OSError (an internal error)."""
    import errno

    from evaclip_cli.atomic import cannot

    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        return None
    if not e.filename:
        return f"evaclip: error: a write failed: {(e.strerror or 'error').lower()}; free some space or choose " \
               "another output"
    return f"evaclip: error: cannot write {e.filename}: {cannot(e, e.filename)}"


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # `python -m evaclip_cli.cli.app` (the benchmarks); `python -m evaclip_cli.cli` is the same
    entry()
