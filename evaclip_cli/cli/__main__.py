"""``python -m evaclip_cli.cli``: what the launchers (torchrun, deepspeed, sbatch) start on every rank. Like the
``evaclip`` console script it defers the open_clip integration (``evaclip_cli/__init__.py``) and makes OpenMP threads
wait passively unless ``OMP_WAIT_POLICY`` is set (``evaclip_entry.py``). A rank a launcher started ends with it
(``evaclip_cli/lifeline.py``)."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if "LOCAL_RANK" in os.environ:  # a rank (engine.launch.under_launcher): die with the agent and the launcher
    from evaclip_cli.lifeline import watch_launcher

    watch_launcher()

from evaclip_cli.cli.app import entry  # noqa: E402

entry()
