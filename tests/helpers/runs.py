"""Running evaclip's training commands from tests: each run in its own process (DeepSpeed engines are not
independent within one process), with the demo data and CPU settings of the session's ``env`` fixture."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
EVACLIP = [sys.executable, "-m", "evaclip_cli.cli"]
NAN_AT = [sys.executable, str(Path(__file__).parent / "nan_injection.py")]  # the CLI with NaN losses at attempts


def train(env, out, *args, check=True, timeout=600, command="train"):
    """``evaclip train --out OUT ARGS`` in a subprocess; asserts success unless check=False."""
    r = subprocess.run([*EVACLIP, command, "--out", str(out), *args], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def metrics(out):
    """(training records, eval records) of a run's metrics.jsonl."""
    rows = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if any(k.endswith("acc1") for k in r)]
