"""evaclip's integration with timm and open_clip (``evaclip_cli.models.openclip_compat.integrate``): every path an
open_clip user takes with an evaclip folder, both import orders, the version guard, no stale copies, and the
console script that defers all of it."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from safetensors.torch import load_file

import evaclip_cli  # noqa: F401  (integrates)
from evaclip_cli.checkpoints.folders import write_open_clip_folder
from evaclip_cli.models.openclip_compat import INDEX_NAME, SUPPORTED_OPEN_CLIP, WEIGHTS_NAME
from evaclip_cli.models.specs import ARCHS

from helpers.hub_server import HubServer

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "open_clip", "timm", "deepspeed")
# what integrate() replaces: (module, name)
PATCHED = [("open_clip.model", "_build_vision_tower"), ("open_clip.factory", "_find_checkpoint_in_dir"),
           ("open_clip.factory", "load_state_dict"), ("open_clip.pretrained", "download_pretrained_from_hf")]


def python(code: str, env=None, check=True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def state(tiny_clip_folder):
    return load_file(str(tiny_clip_folder / WEIGHTS_NAME))


@pytest.fixture(scope="module")
def sharded_folder(state, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded") / "tiny"
    write_open_clip_folder(state, ARCHS["tiny"], folder, max_shard_size="2MB")
    assert not (folder / WEIGHTS_NAME).exists()
    assert len(set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values())) >= 3
    return folder


def assert_loaded(model, state):
    got = model.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k


# ------------------------------------------------------------------------------------------- open_clip, local-dir:
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_every_open_clip_entry_point_loads_a_folder(sharded, tiny_clip_folder, sharded_folder, state):
    folder = sharded_folder if sharded else tiny_clip_folder
    name = f"local-dir:{folder}"
    model, train_tf, val_tf = open_clip.create_model_and_transforms(name)
    assert_loaded(model, state)
    assert val_tf.transforms[0].size == ARCHS["tiny"].vision.image_size
    assert_loaded(open_clip.create_model(name), state)
    model, preprocess = open_clip.create_model_from_pretrained(name)
    assert_loaded(model, state)
    tokens = open_clip.get_tokenizer(name)(["a photo of a cat"])
    assert tokens.shape == (1, ARCHS["tiny"].text.context_length)
    with torch.no_grad():
        assert model.encode_text(tokens).shape == (1, ARCHS["tiny"].embed_dim)
    # the weights file alone, through open_clip's public loader
    fresh = open_clip.create_model(name, load_weights=False)
    open_clip.load_checkpoint(fresh, str(folder / (INDEX_NAME if sharded else WEIGHTS_NAME)))
    assert_loaded(fresh, state)


def test_sharded_folder_prefers_the_single_file_when_both_exist(tiny_clip_folder, tmp_path):
    import shutil

    folder = tmp_path / "both"
    shutil.copytree(tiny_clip_folder, folder)
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": {"x": "missing.safetensors"}}))
    assert open_clip.create_model(f"local-dir:{folder}") is not None  # the index (broken here) is not read


# ----------------------------------------------------------------------------------------------- open_clip, hf-hub:
def test_hf_hub_sharded_repo(sharded_folder, state, tmp_path):
    """A repo with index + shards (what `evaclip push` uploads for large models) loads through every hf-hub path."""
    files = {p.name: p.read_bytes() for p in sharded_folder.iterdir()}
    with HubServer() as hub:
        hub.create("tester/tiny-sharded", files=files)
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf"),
                   HF_HUB_DISABLE_TELEMETRY="1")
        env.pop("HF_TOKEN", None)
        res = python("""
            import hashlib, json
            import evaclip_cli, open_clip

            def digest(model):
                return {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()
                        for k, v in model.state_dict().items()}

            name = "hf-hub:tester/tiny-sharded"
            out = {"transforms": digest(open_clip.create_model_and_transforms(name)[0]),
                   "create_model": digest(open_clip.create_model(name)),
                   "from_pretrained": digest(open_clip.create_model_from_pretrained(name)[0]),
                   "download_pretrained": open_clip.download_pretrained({"hf_hub": "tester/tiny-sharded/"})}
            print(json.dumps(out))
        """, env)
    assert "Could not find/download default weights" not in res.stderr, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    import hashlib

    want = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in state.items()}
    for path in ("transforms", "create_model", "from_pretrained"):
        assert out[path] == want, path
    assert out["download_pretrained"].endswith(INDEX_NAME)  # open_clip's pretrained-tag path finds the shards too


# --------------------------------------------------------------------------------------------- CLIPVisionCfg field
def test_vision_cfg_field_on_open_clips_own_class():
    import open_clip.coca_model
    import open_clip.model

    cls = open_clip.CLIPVisionCfg
    assert open_clip.model.CLIPVisionCfg is cls and open_clip.coca_model.CLIPVisionCfg is cls
    names = [f.name for f in dataclasses.fields(cls)]
    assert names[-1] == "timm_model_kwargs" and names.count("timm_model_kwargs") == 1
    cfg = cls(timm_model_name="evaclip_vit", timm_model_kwargs={"depth": 2})
    assert cfg.timm_model_kwargs == {"depth": 2} and cls().timm_model_kwargs is None
    assert dataclasses.asdict(cfg)["timm_model_kwargs"] == {"depth": 2}
    assert "timm_model_kwargs={'depth': 2}" in repr(cfg)
    assert cls(width=5) == cls(width=5) != cls(width=6) and cls.__hash__ is None  # stock dataclass semantics
    assert cls().layers == 12 and cls().timm_pool == "avg"  # the other defaults untouched
    with pytest.raises(TypeError):
        cls(not_a_field=1)


def test_timm_model_kwargs_reach_timm_and_only_their_tower():
    kw = ARCHS["tiny"].vision.timm_kwargs()
    visual = open_clip.model._build_vision_tower(64, {"timm_model_name": "evaclip_vit", "timm_model_kwargs": kw,
                                                      "timm_pool": "token", "image_size": 64})
    assert visual.trunk.embed_dim == kw["embed_dim"] and len(visual.trunk.blocks) == kw["depth"]
    with torch.device("meta"):  # no kwargs: the named tower, no leftovers from the previous build
        visual = open_clip.model._build_vision_tower(1536, open_clip.CLIPVisionCfg(
            timm_model_name="evaclip_18b_patch14_224", timm_pool="token"))
    assert visual.trunk.embed_dim == 5120


# --------------------------------------------------------------------------------------------------- stale copies
def test_no_open_clip_module_keeps_an_unpatched_object():
    originals = {}
    for mod, name in PATCHED:
        patched = getattr(sys.modules[mod], name)
        assert getattr(patched, "__evaclip__", False), f"{mod}.{name} is not evaclip's"
        originals[f"{mod}.{name}"] = patched.__wrapped__
    import open_clip.coca_model
    import open_clip.factory
    import open_clip.pretrained

    assert open_clip.coca_model._build_vision_tower is open_clip.model._build_vision_tower
    assert open_clip.factory.download_pretrained_from_hf is open_clip.pretrained.download_pretrained_from_hf
    stale = [f"{mod_name}.{attr} is the original {what}"
             for mod_name, mod in list(sys.modules.items())
             if mod is not None and mod_name.split(".")[0] in ("open_clip", "open_clip_train")
             for attr, value in list(vars(mod).items())
             for what, orig in originals.items() if value is orig]
    assert stale == []


def test_integrate_is_idempotent():
    from evaclip_cli.models.openclip_compat import integrate

    before = {f"{m}.{n}": getattr(sys.modules[m], n) for m, n in PATCHED}
    integrate()
    assert {f"{m}.{n}": getattr(sys.modules[m], n) for m, n in PATCHED} == before
    assert [f.name for f in dataclasses.fields(open_clip.CLIPVisionCfg)].count("timm_model_kwargs") == 1


# ------------------------------------------------------------------------------------------------------------ timm
def test_towers_are_timm_models():
    assert {"evaclip_18b_patch14_224", "evaclip_8b_patch14_224", "evaclip_vit"} <= set(timm.list_models("evaclip*"))
    for name, width in (("evaclip_18b_patch14_224", 5120), ("evaclip_8b_patch14_224", 4096)):
        with torch.device("meta"):
            tower = timm.create_model(name, pretrained=False)
        assert tower.embed_dim == width and tower.pretrained_cfg["architecture"] == name
    tower = timm.create_model("evaclip_vit", pretrained=False, **ARCHS["tiny"].vision.timm_kwargs())
    assert tower.blocks[0].norm1.__class__.__name__ == "RmsNorm"


# ------------------------------------------------------------------------------------------ fresh processes: imports
@pytest.mark.parametrize("imports", ["evaclip_cli, open_clip", "open_clip, evaclip_cli"])
def test_import_order(imports, sharded_folder):
    python(f"""
        import {imports}
        import timm
        model, _, _ = open_clip.create_model_and_transforms("local-dir:{sharded_folder}")
        assert timm.is_model("evaclip_18b_patch14_224")
        assert open_clip.CLIPVisionCfg(timm_model_kwargs={{}}).timm_model_kwargs == {{}}
    """)


def test_other_open_clip_version_is_refused_with_one_line():
    other = "3.4.0"
    # a library import: ImportError, one line, nothing patched
    res = python(f"""
        import dataclasses, open_clip
        open_clip.__version__ = "{other}"
        try:
            import evaclip_cli
        except ImportError as e:
            print(str(e))
        assert "timm_model_kwargs" not in {{f.name for f in dataclasses.fields(open_clip.CLIPVisionCfg)}}
        assert not getattr(open_clip.factory.load_state_dict, "__evaclip__", False)
    """)
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and SUPPORTED_OPEN_CLIP in lines[0] and other in lines[0], res.stdout
    # the command line: a command that builds a model ends with one line, exit code 2
    res = python(f"""
        import sys, evaclip_entry
        evaclip_entry.COMMAND_LINE = True
        import open_clip
        open_clip.__version__ = "{other}"
        from evaclip_cli.cli import main
        sys.exit(main(["estimate", "--recipe", "tiny"]))
    """, check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaclip: error: ") and other in lines[0], res.stderr


def test_console_script_defers_the_integration_to_the_commands():
    """`evaclip --help` imports none of torch/timm/open_clip; a command that builds a model integrates."""
    assert "from evaclip_entry import main" in (Path(sys.executable).parent / "evaclip").read_text()
    res = python(f"""
        import json, sys, evaclip_entry
        def run(*argv):
            sys.argv = ["evaclip", *argv]
            try:
                evaclip_entry.main()
            except SystemExit as e:
                return e.code or 0
        assert run("--help") == 0
        light = [m for m in {HEAVY!r} if m in sys.modules]
        assert run("estimate", "--recipe", "tiny") == 0
        import open_clip, timm
        print(json.dumps({{"light": light, "registered": timm.is_model("evaclip_vit"),
                          "field": "timm_model_kwargs" in open_clip.CLIPVisionCfg.__dataclass_fields__}}))
    """)
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"light": [], "registered": True, "field": True}


def test_python_m_defers_the_integration_like_the_console_script():
    """`python -m evaclip_cli.cli` (what the launchers start on every rank) is the command line too: `--help` imports
    none of torch/timm/open_clip (seen by `-X importtime`), a command that builds a model integrates, and a plain
    `import evaclip_cli` still integrates at once."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-u", "-X", "importtime", "-m", "evaclip_cli.cli", "--help"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "estimate" in res.stdout, res.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time")}
    assert "evaclip_cli.cli.app" in imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))
    res = subprocess.run([sys.executable, "-m", "evaclip_cli.cli", "estimate", "--recipe", "tiny"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "tiny" in res.stdout, res.stderr[-2000:]
    res = python("""
        import sys, evaclip_cli
        import timm
        assert "open_clip" in sys.modules and timm.is_model("evaclip_vit")
    """)
