"""evaclip convert --from deepspeed: real DeepSpeed checkpoints (ZeRO 0-3, 1-2 ranks, zero.Init) of the tiny CLIP
become open_clip folders with the engine's exact fp32 weights.

Each checkpoint comes from its own torchrun launch of tests/helpers/ds_tiny_checkpoint.py (2 optimizer steps on
CPU), since several DeepSpeed engines in one process are not independent.
"""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

import evaclip_cli  # noqa: F401  (teaches open_clip to load evaclip folders)
from evaclip_cli.checkpoints.convert import run_convert
from evaclip_cli.errors import UserError

from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "helpers" / "ds_tiny_checkpoint.py"
TAG = "global_step2"

# (ZeRO stage, ranks, zero.Init)
CASES = [(0, 1, False), (1, 2, False), (2, 2, False), (3, 2, False), (3, 2, True)]


def _ids(case):
    stage, nproc, zero_init = case
    return f"zero{stage}-{nproc}rank" + ("-zeroinit" if zero_init else "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, stage: int, nproc: int, zero_init: bool) -> Path:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", str(SCRIPT), str(out), "--stage", str(stage)]
    if zero_init:
        cmd.append("--zero-init")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{_ids((stage, nproc, zero_init))}: launch timed out after {e.timeout} s")
    assert r.returncode == 0, f"launch failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(stage, nproc, zero_init) -> OUT folder (ckpt/, evaclip_recipe.toml, expected*.pt); each case is
    launched once per module."""
    cache = {}

    def get(stage, nproc, zero_init=False):
        key = (stage, nproc, zero_init)
        if key not in cache:
            cache[key] = launch(tmp_path_factory.mktemp(_ids(key)), *key)
        return cache[key]

    return get


def check_folder(folder: Path, out: Path):
    """The open_clip folder holds exactly the engine's weights and computes the engine's embeddings."""
    expected = torch.load(out / "expected.pt")
    ref = torch.load(out / "expected_out.pt")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    state = model.state_dict()
    assert set(state) == set(expected)
    assert state["logit_scale"].shape == torch.Size([])  # [1] inside the engine, [] in the folder
    assert expected["logit_scale"].shape == torch.Size([1])
    for k, want in expected.items():
        got = state[k]
        assert got.dtype == torch.float32, k
        assert torch.equal(got, want.reshape(got.shape)), f"{k}: max diff {(got - want.reshape(got.shape)).abs().max()}"
    with torch.no_grad():
        image = model.encode_image(ref["images"])
        text = model.encode_text(ref["tokens"])
    # ZeRO-3 computes Linear as matmul + bias (not addmm): ~1 ulp apart from the plain module
    torch.testing.assert_close(image, ref["image"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(text, ref["text"], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_deepspeed_checkpoint_to_open_clip(case, checkpoint, tmp_path, capsys):
    """API on the checkpoint root (resolves 'latest'), CLI on the tag folder: both equal the engine bit for bit."""
    out = checkpoint(*case)
    ckpt = out / "ckpt"
    assert (ckpt / "latest").read_text().strip() == TAG
    if case[0] > 0:
        assert list((ckpt / TAG).glob("zero_pp_rank_*_optim_states.pt")), "expected a ZeRO checkpoint"

    api = tmp_path / "api"
    files = run_convert(ckpt, api, src_format="deepspeed", quiet=True)
    assert files == ["open_clip_config.json", "open_clip_model.safetensors"]
    check_folder(api, out)

    cli = tmp_path / "cli"
    code, _, err = run_cli(["convert", ckpt / TAG, cli, "--from", "deepspeed"], capsys)
    assert code == 0, err
    check_folder(cli, out)


def test_deepspeed_without_recipe(checkpoint, tmp_path, capsys):
    """No recipe near the checkpoint and no --recipe/--model: one-line error, exit 2; --recipe/--model fix it."""
    out = checkpoint(0, 1)
    bare = tmp_path / "bare" / "ckpt"  # nothing in bare/, bare/.. is tmp_path: no recipe anywhere
    shutil.copytree(out / "ckpt", bare)

    for src in (bare, bare / TAG):
        with pytest.raises(UserError, match="evaclip_recipe.toml") as e:
            run_convert(src, tmp_path / "never", src_format="deepspeed", quiet=True)
        assert "--recipe" in str(e.value) and "\n" not in str(e.value)

        code, stdout, err = run_cli(["convert", src, tmp_path / "never", "--from", "deepspeed"], capsys)
        assert code == 2
        assert err.startswith("evaclip: error:") and err.count("\n") == 1 and "--recipe" in err, err
        assert "Traceback" not in err and not stdout
    assert not (tmp_path / "never").exists()
    assert not list(tmp_path.glob(".never*"))  # no temporary left behind

    code, _, err = run_cli(["convert", bare, tmp_path / "by_recipe", "--from", "deepspeed", "--recipe", "tiny"],
                           capsys)
    assert code == 0, err
    check_folder(tmp_path / "by_recipe", out)
    run_convert(bare / TAG, tmp_path / "by_model", model="tiny", quiet=True)  # format auto-detected from the tag dir
    check_folder(tmp_path / "by_model", out)


@pytest.mark.slow
def test_stage0_bf16_exports_fp32_masters(tmp_path):
    """Without ZeRO a bf16 run's module holds rounded weights; the export takes the fp32 masters instead."""
    from conftest import ROOT

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "evaclip_cli.cli", "train", "--out", str(out), "--recipe", "tiny",
                        "deepspeed.precision=bf16", "data.samples=128", "eval.every_steps=0",
                        "data.demo=true"], cwd=ROOT, env={**env, "EVACLIP_DEMO_DIR": str(tmp_path / "demo")},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from evaclip_cli.checkpoints.io import load_state_dict

    final = load_state_dict(out / "final" / "open_clip_model.safetensors")
    w = final["visual.trunk.blocks.0.attn.qkv.weight"]
    assert w.dtype == torch.float32
    assert not torch.equal(w, w.bfloat16().float())  # real fp32 values, not widened bf16


# ------------------------------------------------------------------------------------------- streamed reading
def test_zero_reader_streams_and_spells_deepspeeds_keys(checkpoint):
    """ZeRO-3 parameters come back lazy (gathered from the mmap'd partitions when written), equal to DeepSpeed's own
    consolidation; the key names evaclip spells (not to import DeepSpeed for a conversion) are DeepSpeed's."""
    import contextlib
    import io

    from deepspeed.checkpoint import constants
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from evaclip_cli.checkpoints.deepspeed import C, ZeroParam, load_deepspeed_state
    from evaclip_cli.models.lazy import materialize

    for k, v in vars(C).items():
        if k.isupper():
            assert getattr(constants, k) == v, k
    for case in ((3, 2, False), (2, 2, False)):
        ckpt = checkpoint(*case) / "ckpt"
        ours = load_deepspeed_state(ckpt)
        with contextlib.redirect_stdout(io.StringIO()):
            theirs = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
        assert set(ours) == set(theirs)
        lazy = [k for k, v in ours.items() if isinstance(v, ZeroParam)]
        assert len(lazy) == sum(1 for k in theirs if not k.endswith("attn_mask")), "every parameter is streamed"
        for k, v in theirs.items():
            assert torch.equal(materialize(ours[k]), v), k


def test_zero_checkpoint_missing_a_rank(checkpoint, tmp_path, capsys):
    """A ZeRO checkpoint with one rank's optimizer file gone (a copy that stopped early): one line, exit 2."""
    src = tmp_path / "ckpt"
    shutil.copytree(checkpoint(3, 2) / "ckpt", src)
    shutil.copy(checkpoint(3, 2) / "evaclip_recipe.toml", tmp_path / "evaclip_recipe.toml")
    (src / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    code, _, err = run_cli(["convert", src, tmp_path / "out", "--from", "deepspeed"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "2 processes" in err and "ranks [0]" in err, err
    assert not (tmp_path / "out").exists()


def test_zero3_checkpoint_to_hf_layout(checkpoint, tmp_path):
    """--to hf from a ZeRO-3 checkpoint splits the gathered qkv into BAAI's q/k/v one part at a time: the same
    files as from the exported open_clip folder."""
    from evaclip_cli.checkpoints.io import load_sharded_safetensors_mmap, load_state_dict

    out = checkpoint(3, 2)
    run_convert(out / "ckpt", tmp_path / "oc", src_format="deepspeed", quiet=True)
    run_convert(out / "ckpt", tmp_path / "hf_ds", src_format="deepspeed", dst_format="hf", quiet=True)
    run_convert(tmp_path / "oc", tmp_path / "hf_oc", dst_format="hf", quiet=True)

    def read(folder):
        f = folder / "model.safetensors"
        if f.is_file():
            return load_state_dict(f)
        return load_sharded_safetensors_mmap(folder / "model.safetensors.index.json")

    a, b = read(tmp_path / "hf_ds"), read(tmp_path / "hf_oc")
    assert set(a) == set(b) and any(".q_proj." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_synthetic_zero3_bench_checkpoint_is_deepspeeds(tmp_path):
    """bench/convert_memory.py --real-18b --only zero3 measures on a synthetic ZeRO-3 checkpoint; at toy width
    (--smoke) DeepSpeed's own zero_to_fp32 reads it as evaclip does, and the convert runs."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "convert_memory.py"), "--real-18b", "--smoke", "--only",
                        "zero3", "--dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "reads the same through DeepSpeed's zero_to_fp32" in r.stdout, r.stdout
    assert "| ZeRO-3, 2 ranks |" in r.stdout, r.stdout
