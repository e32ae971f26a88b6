"""Run the evaclip command line with the CLIP stage's loss multiplied by a factor at chosen micro-batch attempts
(a finite loss spike, what the spike guard exists for).

    python tests/helpers/spike_injection.py 7,8 30 train --recipe tiny ...

Attempts are counted 1-based from the start of this process, one per call of the stage's loss, so a spike is not
injected again after the guard rolls the run back.
"""
import sys

from evaclip_cli.stages.clip import ClipStage


def main() -> int:
    at = {int(s) for s in sys.argv[1].split(",") if s.strip()}
    factor = float(sys.argv[2])
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

    return cli_main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
