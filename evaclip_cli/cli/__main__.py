"""``python -m evaclip_cli.cli``: what the launchers (torchrun, deepspeed, sbatch) start on every rank."""
from evaclip_cli.cli.app import entry

entry()
