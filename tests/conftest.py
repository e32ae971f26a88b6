import os
import sys
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
