"""Run the evaclip command line with ``evaclip embed`` pausing after each tensor file it writes, so a test can kill it
between the files of one output shard (its embeddings written, its metadata not yet):

    python tests/helpers/slow_embed.py SECONDS embed INPUT -m MODEL -o OUT ...
"""
import sys
import time

from evaclip_cli.eval import embed


def main() -> int:
    pause = float(sys.argv[1])
    original = embed._write_tensor

    def write_tensor(*args, **kwargs):
        original(*args, **kwargs)
        time.sleep(pause)

    embed._write_tensor = write_tensor
    from evaclip_cli.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
