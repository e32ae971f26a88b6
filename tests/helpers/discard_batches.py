"""Run the evaclip command line with N batches of the CLIP stage's stream read and dropped after the K-th batch:
the run "never sees" them (their data positions advance as if trained on, nothing else happens).

    python tests/helpers/discard_batches.py 4 4 train --recipe tiny ...

The reference a rolled-back run is compared with: the guard's rollback skips exactly the batches read since the
checkpoint it returns to.
"""
import sys

from evaclip_cli.stages.clip import ClipStage


def main() -> int:
    after, count = int(sys.argv[1]), int(sys.argv[2])
    original = ClipStage.build_loader

    def build_loader(self, ctx, state):
        loader = original(self, ctx, state)
        stage = self

        class Dropping:
            def __iter__(self):
                it = iter(loader)
                for i, batch in enumerate(it):
                    if i == after:
                        for _ in range(count):
                            stage.consumed(batch)
                            batch = next(it)
                    yield batch

        return Dropping()

    ClipStage.build_loader = build_loader
    from evaclip_cli.cli import main as cli_main

    return cli_main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
