"""Run the evaclip command line with the CLIP stage's loss multiplied by a factor at chosen micro-batch attempts
(a finite loss spike, what the spike guard exists for).

    python tests/helpers/spike_injection.py 7,8 30 train --recipe tiny ...

Attempts are counted 1-based from the start of this process, one per call of the stage's loss, so a spike is not
injected again after the guard rolls the run back.
"""
import sys

from nan_injection import attempts, scaled_loss_cli  # this folder is the script's sys.path[0]

if __name__ == "__main__":
    sys.exit(scaled_loss_cli(attempts(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]))
