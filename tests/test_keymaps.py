"""The HF <-> open_clip key maps on full-size layouts (the 8B's and the tiny demo's, built on the meta device): every
name, shape and tensor type pinned against tests/fixtures/keymaps_hf_golden.json, recorded from the maps before they
became tables (block indices folded to N, with how many blocks have each key). The HF reference fixtures
(tests/test_hf_layout.py) check the values; this checks the names at the sizes the fixtures do not have."""
import json
import re

import pytest
import torch

from evaclip_cli.models.clip import build_clip
from evaclip_cli.models.keymaps import hf_to_open_clip, open_clip_to_hf
from evaclip_cli.models.lazy import LazyTensor
from evaclip_cli.models.specs import resolve_arch

from conftest import FIXTURES

GOLDEN = json.loads((FIXTURES / "keymaps_hf_golden.json").read_text())


def _folded(state: dict) -> list:
    rows: dict = {}
    for k, v in state.items():
        p = re.sub(r"\.\d+\.", ".N.", k)
        rows.setdefault(p, [p, type(v).__name__, list(v.shape), 0])[3] += 1
    return list(rows.values())


@pytest.mark.parametrize("arch", ["tiny", "8b"])
def test_hf_key_maps_match_the_recorded_names(arch):
    meta = {k: v for k, v in build_clip(resolve_arch(arch), device="meta").state_dict().items() if k != "logit_scale"}
    hf, notes = open_clip_to_hf(meta)
    assert notes == [] and _folded(hf) == GOLDEN[f"{arch}/oc2hf"]
    plain = {k: torch.empty(v.shape, device="meta") if isinstance(v, LazyTensor) else v for k, v in hf.items()}
    back, _ = hf_to_open_clip(plain)
    assert _folded(back) == GOLDEN[f"{arch}/hf2oc"]
    assert set(back) == set(meta) | {"logit_scale"}  # every tensor of the model, and ln(100) (HF has none)
