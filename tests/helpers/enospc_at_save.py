"""Run the evaclip command line with the Nth checkpoint write failing as a full disk does (ENOSPC).

    python tests/helpers/enospc_at_save.py 2 train --recipe tiny ...

The engine's checkpoint writer (DeepSpeed's ``save_checkpoint``) raises ``OSError(ENOSPC)`` on its Nth call in
this process, after writing part of the files, as a disk that fills up does.
"""
import errno
import sys


def main() -> int:
    nth = int(sys.argv[1])
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine.save_checkpoint
    calls = 0

    def save_checkpoint(self, save_dir, tag=None, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth:
            from pathlib import Path

            partial = Path(save_dir) / str(tag)
            partial.mkdir(parents=True, exist_ok=True)
            (partial / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 cut short")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, save_dir, tag, *args, **kwargs)

    DeepSpeedEngine.save_checkpoint = save_checkpoint
    from evaclip_cli.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
