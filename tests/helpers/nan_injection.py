"""Run the evaclip command line with the CLIP stage's loss made non-finite at chosen micro-batch attempts.

    python tests/helpers/nan_injection.py 3,7 train --recipe tiny ...

Attempts are counted 1-based from the start of this process, one per call of the stage's loss (a skipped attempt
counts too), which exercises the engine's skip-and-count and stop-after-N rules end to end without a test hook in
the engine itself. ``scaled_loss_cli`` is shared with spike_injection.py (a finite factor).
"""
import sys

from evaclip_cli.stages.clip import ClipStage


def scaled_loss_cli(at: set, factor: float, argv: list) -> int:
    """The command line ``argv`` with ClipStage's loss multiplied by ``factor`` at the attempts in ``at``."""
    original = ClipStage.loss
    attempts = 0

    def loss(self, ctx, batch, step):
        nonlocal attempts
        value, metrics = original(self, ctx, batch, step)
        attempts += 1
        if attempts in at:
            value = value * factor
        return value, metrics

    ClipStage.loss = loss
    from evaclip_cli.cli import main as cli_main

    return cli_main(argv)


def attempts(text: str) -> set:
    return {int(s) for s in text.split(",") if s.strip()}


if __name__ == "__main__":
    sys.exit(scaled_loss_cli(attempts(sys.argv[1]), float("nan"), sys.argv[2:]))
