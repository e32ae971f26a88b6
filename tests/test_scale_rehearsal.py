"""bench/scale_rehearsal.py stays runnable: its --smoke mode takes toy widths through the same lifecycle (2-rank ZeRO-3
LAMB run, kill -9 after a checkpoint, resume, streamed convert, eval zeroshot, memory phases beside the estimate)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_scale_rehearsal_smoke(tmp_path):
    out = tmp_path / "rehearsal.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "scale_rehearsal.py"), "--smoke", "--dir", str(tmp_path),
                        "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["loss_diff"] < 1e-6 and res["weight_diff"] < 1e-6  # killed + resumed = uninterrupted
    assert res["killed_at_step"] < 5, "the job was killed before its end"
    assert len(res["memory"]) == 2
    for rank in res["memory"]:
        assert list(rank["points_bytes"]) == ["start", "model", "engine", "step1", "released"]
        assert rank["peak_bytes"] >= max(rank["points_bytes"].values())
    assert 0 <= res["eval"]["metrics"]["acc1"] <= 1
    assert not list(tmp_path.glob("rehearsal-*")), "the work folder is removed without --keep"
