"""Every shipped recipe: parsed, model built on the meta device, parameter count checked; schema behaviour."""
import pytest

from evaclip_cli.errors import UserError
from evaclip_cli.models.clip import build_clip, tower_params
from evaclip_cli.models.specs import REFERENCE_PARAMS
from evaclip_cli.recipes import builtin_names, load_recipe

# parameter counts of every shipped recipe's model (released ones are the paper's exact counts)
EXPECTED = {
    "18b": REFERENCE_PARAMS["18b"],
    "8b": REFERENCE_PARAMS["8b"],
    "5b": REFERENCE_PARAMS["5b"],
    "b16": REFERENCE_PARAMS["b16"],
    "distill-18b": REFERENCE_PARAMS["18b"],
    "distill-tiny": 4_167_937,
    "tiny-student": 4_167_937,  # the student arch as a CLIP (distill uses its vision tower)
    "video-18b": REFERENCE_PARAMS["18b"],
    "video-tiny": 3_684_225,  # the tiny CLIP, continued on video
    "finetune-8b": REFERENCE_PARAMS["8b"],  # the released EVA-CLIP-8B (init.clip), its model from the table
    "finetune-tiny": 3_684_225,  # the tiny CLIP from `evaclip train --recipe tiny`
    "tiny": 3_684_225,
    "clipa-h14": 986_067_201,
    "clipa-h14-ft224": 986_067_201,
    "clipa-h14-ft336": 986_067_201 + (577 - 257) * 1280,  # 336 px: 24x24 grid, pos_embed grows
}


def test_every_shipped_recipe_is_covered():
    assert set(builtin_names()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_recipe_builds(name):
    recipe = load_recipe(name).recipe
    model = build_clip(recipe.spec(), device="meta")
    assert tower_params(model)["total"] == EXPECTED[name]
    assert recipe.image_tokens() >= 2 and recipe.text_tokens() >= 2


def test_18b_is_the_papers_recipe():
    r = load_recipe("18b").recipe
    assert (r.optimizer.name, r.optimizer.lr, r.optimizer.text_lr) == ("lamb", 4e-4, 4e-5)
    assert (r.optimizer.layer_decay, r.optimizer.text_layer_decay, r.optimizer.weight_decay) == (0.9, 0.75, 0.05)
    assert (r.schedule.kind, r.schedule.warmup_steps) == ("cosine", 2000)
    assert r.deepspeed.grad_clip == 5.0 and r.deepspeed.precision == "bf16" and r.deepspeed.zero_stage == 3
    assert r.data.global_batch == 108_000 and r.data.samples == 6_000_000_000
    assert r.data.global_batch // (r.data.micro_batch * r.compute.gpus) == 2 and r.compute.gpus == 360
    assert r.steps == 55_556 and r.model.grad_checkpointing


def test_stages_and_token_reduction():
    assert load_recipe("distill-18b").recipe.stage == "distill"
    assert load_recipe("distill-18b").recipe.distill.teacher_arch == "5b"
    assert load_recipe("video-18b").recipe.stage == "video"
    pre = load_recipe("clipa-h14").recipe
    assert pre.image_tokens() == 36 + 1 and pre.text_tokens() == 8  # 84 px / 14 -> 6x6
    ft = load_recipe("clipa-h14-ft224").recipe
    assert ft.image_tokens() == int(256 * 0.7) + 1 and ft.text_tokens() == 32
    ft336 = load_recipe("clipa-h14-ft336").recipe
    assert ft336.image_tokens() == int(576 * 0.6) + 1


def test_overrides_parse_toml_values():
    r = load_recipe("tiny", ["optimizer.lr=3e-4", "deepspeed.zero_stage=3", "optimizer.betas=[0.9, 0.95]",
                             "logging.out_dir=/tmp/x y", "model.vision.depth=5"]).recipe
    assert r.optimizer.lr == 3e-4 and r.deepspeed.zero_stage == 3 and r.optimizer.betas == (0.9, 0.95)
    assert r.logging.out_dir == "/tmp/x y" and r.spec().vision.depth == 5


@pytest.mark.parametrize("override,match", [
    ("optimizer.lrr=1", "unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'"),
    ("optimizer=1", "optimizer"),
    ("deepspeed.zero_stage=4", "zero_stage"),
    ("data.global_batch=100", "multiple of data.micro_batch"),
    ("noequals", "section.key=value"),
])
def test_bad_overrides(override, match):
    with pytest.raises(UserError, match=match) as e:
        load_recipe("tiny", [override])
    assert "\n" not in str(e.value)


def test_unknown_key_names_file_and_suggestion(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('extends = "tiny"\n[optimizer]\nlearning_rate = 1\n')
    with pytest.raises(UserError) as e:
        load_recipe(str(f))
    msg = str(e.value)
    assert str(f) in msg and "optimizer.learning_rate" in msg and "optimizer.lr" in msg


def test_extends_chain_and_sources(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "tiny"\n[optimizer]\nlr = 2e-3\n')
    (tmp_path / "b.toml").write_text('extends = "a"\n[data]\nmicro_batch = 32\n')
    loaded = load_recipe(str(tmp_path / "b.toml"))
    r = loaded.recipe
    assert r.optimizer.lr == 2e-3 and r.data.micro_batch == 32 and r.model.arch == "tiny" and r.name == "b"
    assert [p.rsplit("/", 1)[-1] for p in loaded.chain] == ["tiny.toml", "a.toml", "b.toml"]
    assert loaded.sources["optimizer.lr"].endswith("a.toml")


def test_extends_cycle(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b"\n')
    (tmp_path / "b.toml").write_text('extends = "a"\n')
    with pytest.raises(UserError, match="cycle"):
        load_recipe(str(tmp_path / "a.toml"))
