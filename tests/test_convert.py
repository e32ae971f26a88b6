"""evaclip convert: parity with the reference implementation, layouts, round trips, sharding, bad input."""
import json

import open_clip
import pytest
import torch
from safetensors import safe_open

import evaclip_cli  # noqa: F401
from evaclip_cli.checkpoints.io import load_state_dict
from evaclip_cli.errors import UserError

from conftest import REFERENCE, STYLES, run_cli


def load_oc(folder):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), preprocess


def embeddings(model, style):
    d = REFERENCE / style
    with torch.no_grad():
        return (model.encode_image(torch.load(d / "images.pt")).float(),
                model.encode_text(torch.load(d / "tokens.pt")).float())


def ref_out(style):
    return torch.load(REFERENCE / style / "ref_out.pt")


@pytest.mark.parametrize("style", STYLES)
def test_reference_parity(style, tmp_path, capsys):
    """The exact documented command; embeddings equal the reference code's on the same weights."""
    d = REFERENCE / style
    out = tmp_path / "oc"
    code, _, err = run_cli(["convert", d / "model.pt", out, "--from", "eva", "--to", "open_clip",
                            "--eva-config", d / "config.json"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    img, txt = embeddings(load_oc(out)[0], style)
    ref = ref_out(style)
    assert (img - ref["image"]).abs().max() < 1e-5
    assert (txt - ref["text"]).abs().max() < 1e-5


def _ref_state(style):
    return torch.load(REFERENCE / style / "model.pt")


@pytest.mark.parametrize("wrap,suffix,dtype", [
    ("module", ".pt", torch.float32), ("state_dict", ".bin", torch.float32), ("model", ".pth", torch.float16),
    (None, ".safetensors", torch.float32), (None, ".pt", torch.bfloat16),
])
def test_released_layouts(wrap, suffix, dtype, tmp_path):
    style = "18b"
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in _ref_state(style).items()}
    src = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(src))
    else:
        torch.save({wrap: state, "epoch": 3} if wrap else state, src)
    out = tmp_path / "oc"
    assert run_cli(["convert", src, out, "--eva-config", REFERENCE / style / "config.json"]) == 0
    img, txt = embeddings(load_oc(out)[0].float(), style)
    tol = 1e-5 if dtype == torch.float32 else 0.05
    assert (img - ref_out(style)["image"]).abs().max() < tol
    assert (txt - ref_out(style)["text"]).abs().max() < tol


def test_module_prefixed_keys(tmp_path):
    state = {f"module.{k}": v for k, v in _ref_state("5b").items()}
    torch.save(state, tmp_path / "m.pt")
    assert run_cli(["convert", tmp_path / "m.pt", tmp_path / "oc", "--eva-config",
                    REFERENCE / "5b" / "config.json"]) == 0


@pytest.mark.parametrize("style", STYLES)
def test_round_trips_bit_exact(style, tmp_path):
    d = REFERENCE / style
    oc1, eva, oc2 = tmp_path / "oc1", tmp_path / "eva.pt", tmp_path / "oc2"
    assert run_cli(["convert", d / "model.pt", oc1, "--eva-config", d / "config.json"]) == 0
    # open_clip folder -> EVA layout (+ its config JSON) -> open_clip folder: bit-exact
    assert run_cli(["convert", oc1, eva, "--to", "eva"]) == 0
    assert (tmp_path / "eva.json").is_file()
    assert run_cli(["convert", eva, oc2, "--eva-config", tmp_path / "eva.json"]) == 0
    a = load_state_dict(oc1 / "open_clip_model.safetensors")
    b = load_state_dict(oc2 / "open_clip_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # EVA -> open_clip -> EVA: every reference parameter comes back bit-exactly (derived rope buffers are dropped)
    ref, back = _ref_state(style), torch.load(eva)
    params = {k for k in ref if "rope." not in k and not k.endswith("attn_mask")}
    text_top = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")
    renamed = {("text." + k if k.startswith(text_top) else k) for k in params}
    assert set(back) == renamed
    for k in params:
        assert torch.equal(ref[k], back["text." + k if k.startswith(text_top) else k]), k


def test_model_name_instead_of_json(tmp_path):
    """--model takes a released name or evaclip arch; here the tiny arch, exported to EVA layout first."""
    from evaclip_cli.checkpoints.folders import write_eva_file
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.specs import ARCHS

    model = build_clip(ARCHS["tiny"])
    write_eva_file(model.state_dict(), ARCHS["tiny"], tmp_path / "tiny.pt")
    assert run_cli(["convert", tmp_path / "tiny.pt", tmp_path / "oc", "--model", "tiny"]) == 0
    loaded = load_oc(tmp_path / "oc")[0]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), model.eval().encode_image(x))


def test_mim_checkpoint_to_vision_tower(tmp_path):
    import timm

    style = "18b"
    ref = _ref_state(style)
    mim = {k[len("visual."):]: v for k, v in ref.items() if k.startswith("visual.") and not k.startswith("visual.head")}
    mim["mask_token"] = torch.randn(1, 1, 64)
    mim["lm_head.weight"], mim["lm_head.bias"] = torch.randn(24, 64), torch.randn(24)
    torch.save({"model": mim}, tmp_path / "mim.pt")
    out = tmp_path / "tower"
    assert run_cli(["convert", tmp_path / "mim.pt", out, "--eva-config", REFERENCE / style / "config.json"]) == 0
    assert {"config.json", "model.safetensors", "mim_extras.safetensors"} <= {p.name for p in out.iterdir()}
    tower = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    # the tower's pooled features equal the CLIP tower's pre-head features of the full conversion
    assert run_cli(["convert", REFERENCE / style / "model.pt", tmp_path / "clip", "--eva-config",
                    REFERENCE / style / "config.json"]) == 0
    clip = load_oc(tmp_path / "clip")[0]
    x = torch.load(REFERENCE / style / "images.pt")
    with torch.no_grad():
        assert torch.allclose(tower(x), clip.visual.trunk(x), atol=1e-6)
    # and back to the MIM layout with mask_token / lm_head intact
    assert run_cli(["convert", out, tmp_path / "mim_back.pt", "--from", "open_clip", "--to", "eva",
                    "--eva-config", REFERENCE / style / "config.json"]) == 0
    back = torch.load(tmp_path / "mim_back.pt")
    assert set(back) == set(mim) and all(torch.equal(back[k], mim[k]) for k in mim)


def test_sharded_output_loads(tmp_path):
    d = REFERENCE / "b16"
    out = tmp_path / "sharded"
    assert run_cli(["convert", d / "model.pt", out, "--eva-config", d / "config.json",
                    "--max-shard-size", "200KB"]) == 0
    index = json.loads((out / "open_clip_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert not (out / "open_clip_model.safetensors").exists()
    total = 0
    for s in shards:
        with safe_open(str(out / s), "pt") as f:
            total += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert total == index["metadata"]["total_size"]
    img, txt = embeddings(load_oc(out)[0], "b16")
    assert (img - ref_out("b16")["image"]).abs().max() < 1e-5


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype(dtype, torch_dtype, tmp_path):
    d = REFERENCE / "5b"
    out = tmp_path / dtype
    assert run_cli(["convert", d / "model.pt", out, "--eva-config", d / "config.json", "--dtype", dtype]) == 0
    with safe_open(str(out / "open_clip_model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch_dtype for k in f.keys())
    img, _ = embeddings(load_oc(out)[0].float(), "5b")
    assert (img - ref_out("5b")["image"]).abs().max() < 0.05


# ------------------------------------------------------------------------------------------------- bad input
def _one_line_error(capsys, args, *needles):
    code, out, err = run_cli(args, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaclip: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_bad_inputs(tmp_path, capsys):
    d = REFERENCE / "18b"
    cfg = d / "config.json"
    _one_line_error(capsys, ["convert", tmp_path / "nope.pt", tmp_path / "o", "--eva-config", cfg], "no such file")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 100)
    _one_line_error(capsys, ["convert", tmp_path / "corrupt.pt", tmp_path / "o", "--eva-config", cfg],
                    "cannot read as a checkpoint")
    _one_line_error(capsys, ["convert", d / "model.pt", tmp_path / "o"], "--eva-config")
    other = REFERENCE / "5b" / "config.json"
    _one_line_error(capsys, ["convert", d / "model.pt", tmp_path / "o", "--eva-config", other],
                    "does not match the model config")
    (tmp_path / "bad.json").write_text("{not json")
    _one_line_error(capsys, ["convert", d / "model.pt", tmp_path / "o", "--eva-config", tmp_path / "bad.json"],
                    "not valid JSON")
    (tmp_path / "incomplete.json").write_text('{"embed_dim": 3}')
    _one_line_error(capsys, ["convert", d / "model.pt", tmp_path / "o", "--eva-config", tmp_path / "incomplete.json"],
                    "missing key")
    _one_line_error(capsys, ["convert", d / "model.pt", tmp_path / "o", "--eva-config", cfg,
                             "--max-shard-size", "lots"], "not a size")
    (tmp_path / "exists").mkdir()
    _one_line_error(capsys, ["convert", d / "model.pt", tmp_path / "exists", "--eva-config", cfg], "--force")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """Nothing is written half: a full disk mid-write (the second shard) is one line, the temporary folder is
    removed, DST never appears."""
    from evaclip_cli.checkpoints import io

    calls = {"n": 0}
    real = io.write_safetensors

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(io, "write_safetensors", flaky)
    d = REFERENCE / "b16"
    from evaclip_cli.checkpoints.convert import run_convert

    with pytest.raises(UserError, match=f"cannot write {tmp_path / 'oc'}: no space left on the device"):
        run_convert(d / "model.pt", tmp_path / "oc", eva_config=d / "config.json", max_shard_size="200KB", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_atomically(tmp_path):
    d = REFERENCE / "8b"
    out = tmp_path / "oc"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert run_cli(["convert", d / "model.pt", out, "--eva-config", d / "config.json", "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / "open_clip_model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["oc"]


def test_sizes_read_and_written_in_the_same_units():
    """`--max-shard-size` reads what messages and model cards print (decimal units): one formatter, one parser."""
    from evaclip_cli.checkpoints.io import format_size, parse_size
    from evaclip_cli.errors import UserError

    assert [format_size(n) for n in (0, 999, 1000, 1.5e9, 36.7e12)] == ["0 B", "999 B", "1.0 KB", "1.5 GB", "36.7 TB"]
    assert format_size(4_299_161_600, 2) == "4.30 GB" and format_size(2e15) == "2000.0 TB"
    for n in (999, 12_000, 5_300_000_000, 2e12):
        assert parse_size(format_size(n)) == pytest.approx(n, rel=0.05)
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("0") == 0
    with pytest.raises(UserError, match="is not a size"):
        parse_size("lots")


def test_pt_files_are_written_tensor_by_tensor_and_read_like_torch_save(tmp_path):
    """`write_torch_file` (EVA .pt/.bin exports, distill's student_mim.pt): the file torch.load reads as it reads
    torch.save's (weights_only, mmap), with the values, dtypes and plain values of the dict, a dtype cast of the
    floating tensors only, and each lazy tensor materialised only after the previous one was written and freed."""
    import gc
    import weakref
    import zipfile

    import torch

    from evaclip_cli.checkpoints.io import write_torch_file
    from evaclip_cli.models.lazy import LazyCat, LazyTensor

    alive: list = []

    class Tracked(LazyTensor):
        def __init__(self, t):
            self.t, self.shape, self.dtype = t, t.shape, t.dtype

        def materialize(self):
            gc.collect()
            assert all(r() is None for r in alive), "a previous tensor is still in memory"
            out = self.t.clone()
            alive.append(weakref.ref(out))
            return out

    from safetensors.torch import save_file

    from evaclip_cli.checkpoints.io import load_safetensors_mmap

    torch.manual_seed(0)
    save_file({"m.a": torch.randn(3, 4), "m.b": torch.randn(7)}, str(tmp_path / "src.safetensors"))
    mapped = load_safetensors_mmap(tmp_path / "src.safetensors")  # views into one file-wide storage
    state = {**mapped, "blocks.0.attn.qkv.weight": torch.randn(12, 4), "pos_embed": torch.randn(1, 5, 4).bfloat16(),
             "ids": torch.arange(6).reshape(2, 3), "flags": torch.tensor([True, False]), "empty": torch.zeros(0, 4),
             "scalar": torch.tensor(2.5), "transposed": torch.randn(3, 4).t(), "epoch": 7, "arch": "eva",
             "fused": LazyCat([torch.randn(2, 4), torch.randn(3, 4)], 0),
             **{f"view.{i}": v for i, v in enumerate(torch.randn(6, 4).chunk(3))},  # storage offsets 0, 8, 16
             **{f"tracked.{i}": Tracked(torch.randn(64, 64)) for i in range(4)}}
    plain = {k: v.t if isinstance(v, Tracked) else v.materialize() if isinstance(v, LazyTensor) else v
             for k, v in state.items()}
    path = tmp_path / "model.pt"
    write_torch_file(path, state)
    assert len(alive) == 4 and zipfile.ZipFile(path).testzip() is None  # CRCs as torch writes them
    for mmap in (False, True):
        got = torch.load(path, weights_only=True, mmap=mmap)
        assert list(got) == list(state)
        for k, v in plain.items():
            if isinstance(v, torch.Tensor):
                assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
            else:
                assert got[k] == v, k
    alive.clear()
    write_torch_file(path, state, dtype=torch.float16)
    got = torch.load(path, weights_only=True)
    assert got["pos_embed"].dtype == got["tracked.0"].dtype == torch.float16
    assert got["ids"].dtype == torch.int64 and got["flags"].dtype == torch.bool
    assert torch.equal(got["tracked.3"], plain["tracked.3"].half())
