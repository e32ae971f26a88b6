"""Run the evaclip command line with the CLIP stage's loss made non-finite at chosen micro-batch attempts.

    python tests/helpers/nan_injection.py 3,7 train --recipe tiny ...

Attempts are counted 1-based from the start of this process, one per call of the stage's loss (a skipped attempt
counts too), which exercises the engine's skip-and-count and stop-after-N rules end to end without a test hook in
the engine itself.
"""
import sys

from evaclip_cli.stages.clip import ClipStage


def main() -> int:
    at = {int(s) for s in sys.argv[1].split(",") if s.strip()}
    original = ClipStage.loss
    attempts = 0

    def loss(self, ctx, batch, step):
        nonlocal attempts
        value, metrics = original(self, ctx, batch, step)
        attempts += 1
        if attempts in at:
            value = value * float("nan")
        return value, metrics

    ClipStage.loss = loss
    from evaclip_cli.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
