"""Shared fixtures. Session-scoped where several modules need the same artefact (the demo data, a tiny CLIP
folder), so it is built once per test run."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
REFERENCE = FIXTURES / "reference"
STYLES = ("18b", "8b", "5b", "b16")


@pytest.fixture
def reference_dir():
    return REFERENCE


def run_cli(args, capsys=None):
    """Run the console entry point in-process; returns (exit code, stdout, stderr) when capsys is given."""
    from evaclip_cli.cli import main

    code = main(list(map(str, args)))
    if capsys is None:
        return code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """Environment for evaclip subprocesses: the demo data made once, CPU DeepSpeed, one OpenMP thread each."""
    demo = tmp_path_factory.mktemp("demo") / "demo_data"
    e = {**os.environ, "EVACLIP_DEMO_DIR": str(demo), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
         "PYTHONPATH": str(ROOT)}
    from evaclip_cli.data.demo import make_demo

    make_demo(demo)
    return e


@pytest.fixture(scope="session")
def tiny_clip_folder(tmp_path_factory):
    """A tiny EVA-CLIP (random weights, seed 0) as an open_clip folder written by evaclip's converter."""
    import torch

    import evaclip_cli  # noqa: F401
    from evaclip_cli.checkpoints.folders import write_open_clip_folder
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.specs import ARCHS

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_clip") / "tiny"
    write_open_clip_folder(build_clip(ARCHS["tiny"]).state_dict(), ARCHS["tiny"], folder)
    return folder
