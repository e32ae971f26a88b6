"""``evaclip status RUN``: where a run stands, from its folder alone (``engine/status.py`` reads it)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def status(
    run: Annotated[Path, typer.Argument(help="The run folder (--out or logging.out_dir of a training run).")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object (for scripts), not the table.")] = False,
):
    """Where a run stands, read from its folder (works from a login node while the job runs): step out of total and
    ETA, the last losses, throughput and MFU, the last complete checkpoint and its age, skips and rollbacks, who holds
    the run (pid, host, alive) and the last error."""
    from evaclip_cli.engine.status import read_status

    st = read_status(run)
    if as_json:
        import json

        typer.echo(json.dumps(st, indent=2))
        return
    from rich.console import Console

    Console().print(_table(st))


def _table(st: dict):
    from rich.table import Table

    from evaclip_cli.engine.status import format_duration

    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    t = Table(title=f"evaclip status {st['run']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("run", f"{st['recipe'] or '?'} ({st['stage'] or '?'}): [bold]{st['state']}[/bold]")
    total = st["total_steps"]
    pct = f" ({100 * st['step'] / total:.1f}%)" if st["step"] is not None and total else ""
    t.add_row("step", f"{num(st['step'], ',')} of {num(total, ',')}{pct}   ETA {format_duration(st['eta_s'])}")
    t.add_row("last losses", "  ".join(f"{r['step']}: {r['loss']:.4f}" for r in st["last_losses"]) or "-")
    speed = f"{num(st['samples_per_s'], ',.1f')} samples/s, step {num(st['step_time_s'], '.3g')} s, " \
            f"data wait {num(None if st['data_wait_frac'] is None else 100 * st['data_wait_frac'], '.0f')}%"
    t.add_row("throughput", speed)
    mfu = "-" if st["mfu"] is None else f"{100 * st['mfu']:.1f}%"
    t.add_row("TFLOP/s per device", f"{num(st['tflops_per_device'], '.3g')}   MFU {mfu}")
    ck = st["last_checkpoint"]
    t.add_row("last checkpoint", "none yet" if ck is None else
              f"step {ck['step']}: {ck['path']} ({format_duration(ck['age_s'])} ago)")
    t.add_row("skipped / rollbacks", f"non-finite {num(st['nonfinite_skipped'], 'd')}, spikes "
              f"{num(st['guard_skipped'], 'd')} / rollbacks {num(st['guard_rollbacks'], 'd')}")
    lock = st["lock"]
    t.add_row("held by", "nobody" if lock is None else
              f"pid {lock['pid']} on {lock['host']} since {lock['since']}: {lock['note']}")
    err = st["last_error"]
    t.add_row("last error", "-" if err is None else f"step {err['step']}: {err['message']}")
    if st["last_eval"]:
        t.add_row("last eval", "  ".join(f"{k} {v:.4f}" for k, v in st["last_eval"].items()))
    t.add_row("metrics updated", f"{format_duration(st['metrics_age_s'])} ago")
    return t
