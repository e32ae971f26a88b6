"""Fine-tuning a released CLIP with locked towers (issue 23, part 1): `init.clip` in a train recipe sets the model
section from the source, `[model.lock]` freezes towers with open_clip's semantics, frozen parameters get no gradients
and no optimizer state (and `evaclip estimate` counts that), the frozen weights come out bit-identical, and a run with
a lock resumes exactly."""
import re
import subprocess
from pathlib import Path

import pytest
import torch

from evaclip_cli.errors import UserError
from evaclip_cli.recipes import LockSection, load_recipe

from helpers.runs import EVACLIP, ROOT, metrics, train


# ------------------------------------------------------------------------------------------------ the recipe
def test_released_name_sets_the_model_section():
    from evaclip_cli.models.specs import RELEASED

    r = load_recipe("finetune-8b").recipe
    assert r.init.clip == "EVA-CLIP-8B" and r.model.lock.image and not r.model.lock.text
    assert r.spec() == RELEASED["EVA-CLIP-8B"].spec()
    # whatever the recipe extends, the shapes are the source's; another image size is a fine-tune's choice
    r = load_recipe("tiny", ["init.clip=EVA-CLIP-8B-448"]).recipe
    assert r.spec() == RELEASED["EVA-CLIP-8B-448"].spec() and r.model.arch == "EVA-CLIP-8B-448"
    r = load_recipe("finetune-8b", ["model.vision.image_size=336"]).recipe
    assert r.spec().vision.image_size == 336 and r.spec().vision.width == 4096


@pytest.mark.parametrize("overrides,needle", [
    (["model.vision.width=1024"], "model.vision.width = 1024, but init.clip (EVA-CLIP-8B) has 4096"),
    (["model.embed_dim=8"], "model.embed_dim = 8"),
    (["init.clip=EVA-8B"], "vision-only MIM encoder"),
    (["stage=distill"], "distill takes init.vision"),
    (["init.vision=EVA-8B"], "initialises both towers, and init.vision = 'EVA-8B' too"),
    (["model.lock.text_unlocked_layers=-1"], "text_unlocked_layers"),
])
def test_recipe_mistakes_are_one_line(overrides, needle):
    with pytest.raises(UserError, match=re.escape(needle)) as e:
        load_recipe("finetune-8b", overrides)
    assert "\n" not in str(e.value)


def test_a_run_folder_gives_its_model(tmp_path):
    """A local source is read at load time: an open_clip folder's config, a run folder's recipe."""
    from evaclip_cli.checkpoints.folders import write_open_clip_folder
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.specs import ARCHS

    spec = ARCHS["tiny"].model_copy(deep=True)
    spec.vision.depth, spec.text.layers = 2, 1
    write_open_clip_folder(build_clip(spec).state_dict(), spec, tmp_path / "run" / "final")
    r = load_recipe("finetune-tiny", [f"init.clip={tmp_path / 'run'}"]).recipe
    got = r.spec()
    assert (got.vision.depth, got.text.layers, got.vision.width, got.embed_dim) == (2, 1, 96, 64)
    with pytest.raises(UserError, match="model.vision.depth = 3, but init.clip"):
        load_recipe("finetune-tiny", [f"init.clip={tmp_path / 'run'}", "model.vision.depth=3"])


# ------------------------------------------------------------------------------------------------ lock semantics
def _trained(lock: dict) -> set:
    import evaclip_cli  # noqa: F401
    from evaclip_cli.models.clip import build_clip, lock_towers
    from evaclip_cli.models.specs import ARCHS

    model = build_clip(ARCHS["tiny"], device="meta")
    n = lock_towers(model, LockSection(**lock))
    names = {k for k, p in model.named_parameters() if p.requires_grad}
    assert n["trained"] == sum(p.numel() for k, p in model.named_parameters() if k in names)
    return names


def test_lock_semantics_are_open_clips():
    every = _trained({})
    lit = _trained({"image": True})  # LiT: the trunk frozen, its projection head trained (open_clip's TimmModel)
    assert not any(k.startswith("visual.trunk.") for k in lit) and "visual.head.proj.weight" in lit
    assert {k for k in every if k.startswith("text.")} <= lit
    one = _trained({"image": True, "image_unlocked_groups": 1})  # the last block and the final norm
    assert {k for k in one if k.startswith("visual.trunk.")} == \
        {k for k in every if k.startswith(("visual.trunk.blocks.2.", "visual.trunk.norm."))}
    text = _trained({"text": True})
    assert not any(k.startswith("text.") for k in text) and "logit_scale" in text
    two = _trained({"text": True, "text_unlocked_layers": 2})  # projection, then last block + ln_final
    assert {k for k in two if k.startswith("text.")} == \
        {k for k in every if k.startswith(("text.text_projection", "text.transformer.resblocks.1.", "text.ln_final"))}
    ln = _trained({"text": True, "text_freeze_layer_norm": False})
    assert {k for k in ln if k.startswith("text.")} == {k for k in every if k.startswith("text.") and ".ln" in k}


def test_layer_decay_groups_skip_frozen_layers():
    import evaclip_cli  # noqa: F401
    from evaclip_cli.engine.params import TowerCfg, build_param_groups, clip_layer_id
    from evaclip_cli.models.clip import build_clip, lock_towers
    from evaclip_cli.models.specs import ARCHS

    model = build_clip(ARCHS["tiny"])
    lock_towers(model, LockSection(image=True, image_unlocked_groups=1))
    towers = {"vision": TowerCfg(1e-3, 0.05, 0.5, 3), "text": TowerCfg(1e-3, 0.05, 0.5, 2)}
    groups = build_param_groups(model.named_parameters(), towers, lambda n: clip_layer_id(n, 3, 2))
    names = {g["name"] for g in groups}
    assert {n.rsplit(".", 1)[0] for n in names if n.startswith("vision.")} == {"vision.layer3", "vision.layer4"}
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    top = next(g for g in groups if g["name"] == "vision.layer3.decay")
    assert top["lr_scale"] == 0.5  # the decay of layer 3 of 3, as without the lock


# ------------------------------------------------------------------------------------------------ estimate
def test_estimate_counts_frozen_parameters_without_optimizer_states():
    from evaclip_cli.estimate import estimate

    lit = estimate(load_recipe("finetune-8b").recipe)
    full = estimate(load_recipe("finetune-8b", ["model.lock.image=false"]).recipe)
    p, q = lit["params"], full["params"]
    assert p["total"] == q["total"] == 8_220_748_545 and q["frozen"] == 0
    assert p["frozen"] > 7_500_000_000 and p["trainable"] + p["frozen"] == p["total"]
    n = lit["cluster"]["gpus"]
    for k in range(4):
        a, b = lit["memory"]["stages"][k], full["memory"]["stages"][k]
        assert a["weights_bytes"] == b["weights_bytes"]  # frozen weights are still held (16-bit; ZeRO-3: a 1/N)
        assert a["optimizer_bytes"] == int(12 * p["trainable"] / (n if k else 1))  # bf16: fp32 master + m + v
        assert a["grads_bytes"] == int(2 * p["trainable"] / (n if k >= 2 else 1))
    assert lit["memory"]["stages"][3]["weights_bytes"] == int(2 * p["total"] / n)
    # the frozen trunk stores no activations and runs forward once
    assert lit["memory"]["activations"]["full"]["total_bytes"] < full["memory"]["activations"]["full"]["total_bytes"]
    assert "vision (frozen)" in lit["flops"]["forward_per_sample"]
    assert lit["flops"]["model_per_sample"] < full["flops"]["model_per_sample"] / 2


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def base(env, tmp_path_factory):
    """A tiny `train` run (30 steps on the demo images): the CLIP the fine-tunes start from."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(env, out, "--recipe", "tiny", "data.samples=1920", "eval.every_steps=0", "logging.checkpoint_every=0")
    return out


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "open_clip_model.safetensors"))


@pytest.mark.slow
def test_lit_finetune_freezes_the_image_trunk(env, base, tmp_path):
    """The frozen trunk is bit-identical after training, the optimizer state holds none of it, the loss goes down."""
    out = tmp_path / "ft"
    r = train(env, out, "--recipe", "finetune-tiny", f"init.clip={base}", "data.samples=1920",
              "logging.log_every=1", "eval.every_steps=0")
    assert "init clip from" in r.stdout and "locked towers: 409,728 parameters frozen" in r.stdout
    before, after = _weights(base / "final"), _weights(out / "final")
    trunk = [k for k in before if k.startswith("visual.trunk.")]
    assert trunk and all(torch.equal(before[k], after[k]) for k in trunk)
    assert not torch.equal(before["visual.head.proj.weight"], after["visual.head.proj.weight"])
    assert not torch.equal(before["text.text_projection"], after["text.text_projection"])
    ckpt = torch.load(out / "checkpoints" / "global_step30" / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)
    names = [n for g in ckpt["param_group_names"] for n in g]
    assert names and not any(n.startswith("visual.trunk.") for n in names)
    assert len(ckpt["optimizer"]["state"]) == len(names) == len(before) - len(trunk)
    assert all(torch.equal(ckpt["module"][k], before[k]) for k in trunk)  # ZeRO-0: frozen weights in the module
    steps = [s["loss"] for s in metrics(out)[0]]
    assert len(steps) == 30 and sum(steps[-5:]) / 5 < sum(steps[:5]) / 5


@pytest.mark.slow
def test_locked_run_resumes_exactly(env, base, tmp_path):
    """Steps 7-12 resumed from step 6's checkpoint have the losses of the uninterrupted run, with both towers
    partly locked (the optimizer holds only the trained groups)."""
    args = ["--recipe", "finetune-tiny", f"init.clip={base}", "data.samples=768", "eval.every_steps=0",
            "logging.log_every=1", "logging.checkpoint_every=6", "model.lock.image_unlocked_groups=1",
            "model.lock.text=true", "model.lock.text_unlocked_layers=2"]

    def run(out, *extra):
        r = subprocess.run([*EVACLIP, "train", "--out", str(out), *args, *extra], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return {s["step"]: s["loss"] for s in metrics(out)[0]}

    full = run(tmp_path / "full")
    assert sorted(full) == list(range(1, 13))
    resumed = run(tmp_path / "resumed", "--resume", str(tmp_path / "full" / "checkpoints" / "global_step6"))
    assert sorted(resumed) == list(range(7, 13)) and all(resumed[k] == full[k] for k in resumed), (full, resumed)
    a, b = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "resumed" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    frozen = _weights(base / "final")
    assert torch.equal(a["visual.trunk.blocks.0.attn.qkv.weight"], frozen["visual.trunk.blocks.0.attn.qkv.weight"])
    assert torch.equal(a["text.token_embedding.weight"], frozen["text.token_embedding.weight"])


@pytest.mark.slow
def test_zero3_frozen_parameters_have_no_fp32_partition(env, base, tmp_path):
    """Two ranks, ZeRO-3: the flat fp32 partitions (master weights; the moments have their size) cover only the
    trained parameters, and the frozen trunk still comes out bit-identical."""
    out = tmp_path / "z3"
    r = subprocess.run([*EVACLIP, "train", "--recipe", "finetune-tiny", "--nproc", "2", "--out", str(out),
                        f"init.clip={base}", "data.samples=256", "deepspeed.zero_stage=3", "eval.every_steps=0",
                        "logging.checkpoint_every=0"], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "partitioned by zero.Init" in r.stdout
    tag = out / "checkpoints" / "global_step4"
    flat = 0
    for rank in range(2):
        sd = torch.load(tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu",
                        weights_only=False)["optimizer_state_dict"]
        flat += sum(t.numel() for t in sd["fp32_flat_groups"])
    before, after = _weights(base / "final"), _weights(out / "final")
    trunk = [k for k in before if k.startswith("visual.trunk.")]
    trained = sum(v.numel() for k, v in before.items() if k not in trunk)
    assert trained <= flat < trained + 2 * len(before)  # padding: at most one element per parameter and rank
    assert all(torch.equal(before[k], after[k]) for k in trunk)


def test_a_hub_source_sets_the_model_at_start(tmp_path, monkeypatch):
    """`init.clip = hf-hub:OWNER/NAME` (not a released name): the recipe cannot know the model without fetching it;
    the stage's prepare_recipe fetches it (loopback Hub, huggingface_hub's cache) and takes its model section."""

    from evaclip_cli.checkpoints.folders import write_open_clip_folder
    from evaclip_cli.models.clip import build_clip
    from evaclip_cli.models.specs import ARCHS
    from evaclip_cli.stages.clip import prepare_recipe

    from helpers.hub_server import HubServer, point_hub_at

    spec = ARCHS["tiny"].model_copy(deep=True)
    spec.vision.depth, spec.text.layers = 2, 1
    folder = tmp_path / "clip"
    write_open_clip_folder(build_clip(spec).state_dict(), spec, folder)
    with HubServer() as hub:
        hub.create("tester/tiny-clip", files={p.name: p.read_bytes() for p in folder.iterdir()}, lfs=True)
        point_hub_at(hub, tmp_path, monkeypatch)
        recipe = load_recipe("finetune-tiny", ["init.clip=hf-hub:tester/tiny-clip"]).recipe
        assert recipe.spec().vision.depth == 3  # unknown at load time: the recipe's own model
        got = prepare_recipe(recipe).spec()
        assert (got.vision.depth, got.text.layers, got.vision.width) == (2, 1, 96)
        with pytest.raises(UserError, match="model.vision.depth = 3, but init.clip"):
            prepare_recipe(load_recipe("finetune-tiny", ["init.clip=hf-hub:tester/tiny-clip",
                                                         "model.vision.depth=3"]).recipe)
