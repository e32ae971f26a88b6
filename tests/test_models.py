"""The EVA-CLIP family: exact parameter counts, the reference config schema, timm/open_clip integration."""
import json

import pytest
import torch

import evaclip_cli  # noqa: F401  (integrates with timm and open_clip)
from evaclip_cli.models.clip import build_clip, resample_pos_embed, tower_params
from evaclip_cli.models.specs import (
    ALIASES,
    ARCHS,
    REFERENCE_PARAMS,
    eva_config_from_spec,
    open_clip_model_cfg,
    resolve_arch,
    spec_from_eva_config,
    spec_from_open_clip_cfg,
)

from conftest import REFERENCE

# vision-tower counts of the reference code on the meta device (tests/fixtures/reference/README.md)
REFERENCE_VISION = {"18b": 17_630_494_720, "8b": 7_526_088_704, "5b": 4_350_556_928, "b16": 86_263_040,
                    # EVA02-CLIP-L/14 and E/14 as open_clip 3.3 builds EVA02-L-14 / EVA02-E-14 (its visual tower)
                    "l14": 304_105_152, "e14": 4_350_556_928}
RELEASED_JSON = {"18b": "EVA-CLIP-18B.json", "8b": "EVA-CLIP-8B.json", "5b": "EVA02-CLIP-bigE-14-plus.json",
                 "b16": "EVA02-CLIP-B-16.json"}


@pytest.mark.parametrize("arch", sorted(REFERENCE_PARAMS))
def test_exact_parameter_counts(arch):
    counts = tower_params(build_clip(ARCHS[arch], device="meta"))
    assert counts["total"] == REFERENCE_PARAMS[arch]
    assert counts["vision"] == REFERENCE_VISION[arch]
    assert counts["other"] == 1  # logit_scale


def test_paper_counts_spelled_out():
    assert REFERENCE_PARAMS == {"18b": 18_325_482_241, "8b": 8_220_748_545, "5b": 5_044_889_089,
                                "b16": 149_691_137, "l14": 427_755_457, "e14": 4_704_589_569}


@pytest.mark.parametrize("arch", sorted(RELEASED_JSON))
def test_reference_json_schema_gives_the_same_model(arch):
    cfg = json.loads((REFERENCE / "configs" / RELEASED_JSON[arch]).read_text())
    spec = spec_from_eva_config(cfg)
    assert spec == ARCHS[arch]
    # and back: our writer produces a config the reader maps to the same spec
    assert spec_from_eva_config(eva_config_from_spec(spec)) == spec


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_open_clip_cfg_round_trip(arch):
    spec = ARCHS[arch]
    back = spec_from_open_clip_cfg(open_clip_model_cfg(spec))
    assert back.vision.model_dump(exclude={"head_bias"}) == spec.vision.model_dump(exclude={"head_bias"})
    assert back.vision.has_head_bias == spec.vision.has_head_bias
    assert back.text == spec.text and back.embed_dim == spec.embed_dim


def test_released_names_resolve():
    for name, key in ALIASES.items():
        assert resolve_arch(name) == ARCHS[key]


def test_unknown_arch_suggests():
    from evaclip_cli.errors import UserError

    with pytest.raises(UserError, match="did you mean '18b'"):
        resolve_arch("19b")


def test_named_towers_are_timm_models():
    import timm

    names = timm.list_models("evaclip*")
    assert {"evaclip_18b_patch14_224", "evaclip_8b_patch14_224", "evaclip_vit"} <= set(names)
    with torch.device("meta"):
        tower = timm.create_model("evaclip_18b_patch14_224")
    assert sum(p.numel() for p in tower.parameters()) == REFERENCE_VISION["18b"] - 5120 * 1536  # minus the head
    assert tower.blocks[0].norm1.__class__.__name__ == "RmsNorm"


def test_timm_names_are_the_registered_constructors():
    """specs' timm names are the constructors evaclip registers (their names are the timm model names)."""
    from evaclip_cli.models import eva
    from evaclip_cli.models.specs import GENERIC_TIMM_NAME, TIMM_NAMES

    for name in (TIMM_NAMES["18b"], TIMM_NAMES["8b"], GENERIC_TIMM_NAME):
        assert getattr(eva, name).__name__ == name
        assert eva.default_cfgs[name].cfgs["untrained"].num_classes == 0


def test_generic_tower_from_json_kwargs():
    """Any tower size travels as JSON (timm_model_kwargs) and builds through open_clip."""
    spec = ARCHS["tiny"]
    cfg = open_clip_model_cfg(spec)
    assert cfg["vision_cfg"]["timm_model_name"] == "evaclip_vit"
    assert json.loads(json.dumps(cfg)) == cfg
    from open_clip.model import CustomTextCLIP

    cfg.pop("custom_text")
    m = CustomTextCLIP(**cfg)
    assert tower_params(m)["total"] == tower_params(build_clip(spec, device="meta"))["total"]
    out = m.encode_image(torch.randn(2, 3, spec.vision.image_size, spec.vision.image_size))
    assert out.shape == (2, spec.embed_dim)


def test_resample_pos_embed():
    g_old, c = 6, 8
    # a smooth field: resampling keeps it smooth and keeps the CLS token untouched
    yy, xx = torch.meshgrid(torch.linspace(0, 1, g_old), torch.linspace(0, 1, g_old), indexing="ij")
    field = (xx + 2 * yy).reshape(1, g_old * g_old, 1).expand(1, -1, c)
    pos = torch.cat([torch.full((1, 1, c), 7.0), field], dim=1)
    out = resample_pos_embed(pos, 16)
    assert out.shape == (1, 1 + 256, c)
    assert torch.equal(out[:, :1], pos[:, :1])
    grid = out[0, 1:, 0].reshape(16, 16)
    assert grid[0, 0] < grid[0, -1] < grid[-1, -1]  # monotone in both directions
    assert torch.allclose(resample_pos_embed(pos, g_old), pos)
    with pytest.raises(ValueError):
        resample_pos_embed(pos[:, :-1], 4)
