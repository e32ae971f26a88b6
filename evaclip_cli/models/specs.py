"""Architecture specs of the EVA-CLIP family: plain data, no torch import.

A spec is the one description of a model that every part of evaclip reads: timm kwargs for the vision tower,
open_clip's ``model_cfg`` for the whole CLIP, the reference repo's JSON schema for ``convert``, parameter and
FLOP counts for ``estimate``.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class VisionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_size: int = 224
    patch_size: int = 14
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    norm: Literal["rms", "layer"] = "layer"
    qkv_bias: bool = True  # q and v bias (EVA style: k has none)
    qkv_fused: bool = True  # one qkv Linear; B/16 has separate q/k/v projections
    post_norm: bool = False  # x + norm(attn(x)) instead of x + attn(norm(x))
    rope: bool = False
    swiglu: bool = False
    subln: bool = False  # extra LayerNorm inside attention (before proj) and MLP (before fc2)
    rope_ref_size: Optional[int] = None  # grid the rope was trained on (B/16: 16 = 224/14)
    head_bias: Optional[bool] = None  # default: same as qkv_bias (reference behaviour)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_dim / self.width

    @property
    def has_head_bias(self) -> bool:
        return self.qkv_bias if self.head_bias is None else self.head_bias

    def timm_kwargs(self) -> dict:
        """JSON-serialisable kwargs for the generic ``evaclip_vit`` timm constructor."""
        kw: dict[str, Any] = dict(
            img_size=self.image_size,
            patch_size=self.patch_size,
            embed_dim=self.width,
            depth=self.depth,
            num_heads=self.heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            qkv_fused=self.qkv_fused,
            norm=self.norm,
            use_post_norm=self.post_norm,
        )
        if self.swiglu:
            kw.update(swiglu_mlp=True)
        if self.subln:
            kw.update(scale_mlp=True, scale_attn_inner=True)
        if self.rope:
            ref = self.rope_ref_size or self.grid
            kw.update(use_rot_pos_emb=True, ref_feat_shape=[ref, ref])
        return kw


class TextSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    width: int = 512
    heads: int = 8
    layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0

    def open_clip_cfg(self) -> dict:
        cfg: dict[str, Any] = dict(context_length=self.context_length, vocab_size=self.vocab_size,
                                   width=self.width, heads=self.heads, layers=self.layers)
        if self.mlp_ratio != 4.0:
            cfg["mlp_ratio"] = self.mlp_ratio
        return cfg


class ClipSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embed_dim: int = 512
    vision: VisionSpec = Field(default_factory=VisionSpec)
    text: TextSpec = Field(default_factory=TextSpec)


# --------------------------------------------------------------------------------------------------------------
# The released family (counts in tests/test_models.py). Keys are evaclip's short names; ALIASES map the
# reference repo's config names (baaivision/EVA model_configs/*.json) onto them.
# --------------------------------------------------------------------------------------------------------------
_TEXT_BIG = TextSpec(width=1280, heads=20, layers=32)

ARCHS: dict[str, ClipSpec] = {
    "18b": ClipSpec(
        embed_dim=1536,
        vision=VisionSpec(patch_size=14, width=5120, depth=48, heads=40, mlp_dim=25600, norm="rms",
                          qkv_bias=False, post_norm=True),
        text=_TEXT_BIG,
    ),
    "8b": ClipSpec(
        embed_dim=1280,
        vision=VisionSpec(patch_size=14, width=4096, depth=32, heads=32, mlp_dim=20480, norm="rms",
                          qkv_bias=False, post_norm=False),
        text=_TEXT_BIG,
    ),
    "5b": ClipSpec(
        embed_dim=1024,
        vision=VisionSpec(patch_size=14, width=1792, depth=64, heads=16, mlp_dim=15360, norm="layer",
                          qkv_bias=True, post_norm=True),
        text=_TEXT_BIG,
    ),
    "b16": ClipSpec(
        embed_dim=512,
        vision=VisionSpec(patch_size=16, width=768, depth=12, heads=12, mlp_dim=2048, norm="layer",
                          qkv_bias=True, qkv_fused=False, rope=True, swiglu=True, subln=True, rope_ref_size=16),
        text=TextSpec(width=512, heads=8, layers=12),
    ),
    # CPU demo scale: 8B style (RMSNorm, no qkv bias, pre-norm) at toy width. Post-norm (18B style) trains
    # several times slower at this size (a supervised probe on digits: 38% vs 73% after 200 steps).
    "tiny": ClipSpec(
        embed_dim=64,
        vision=VisionSpec(image_size=64, patch_size=16, width=96, depth=3, heads=4, mlp_dim=384, norm="rms",
                          qkv_bias=False, post_norm=False),
        text=TextSpec(width=64, heads=4, layers=2, context_length=32),
    ),
    # CLIPA-v2 H/14 (ViT-H/14 tower in EVA form, so the same engine trains it).
    "h14": ClipSpec(
        embed_dim=1024,
        vision=VisionSpec(patch_size=14, width=1280, depth=32, heads=16, mlp_dim=5120, norm="layer",
                          qkv_bias=True, head_bias=False),
        text=TextSpec(width=1024, heads=16, layers=24),
    ),
}

ALIASES: dict[str, str] = {
    "EVA-CLIP-18B": "18b",
    "EVA-CLIP-8B": "8b",
    "EVA02-CLIP-bigE-14-plus": "5b",
    "EVA02-CLIP-E-14-plus": "5b",
    "EVA02-CLIP-B-16": "b16",
}

# Total parameter counts of the released models (reference code, built on the meta device).
REFERENCE_PARAMS = {"18b": 18_325_482_241, "8b": 8_220_748_545, "5b": 5_044_889_089, "b16": 149_691_137}

# timm names: the EVA-CLIP-8B/18B towers are registered by evaclip; 5B and B/16 are timm's own.
TIMM_NAMES = {
    "18b": "evaclip_18b_patch14_224",
    "8b": "evaclip_8b_patch14_224",
    "5b": "eva02_enormous_patch14_clip_224",
    "b16": "eva02_base_patch16_clip_224",
}
GENERIC_TIMM_NAME = "evaclip_vit"


def resolve_arch(name: str) -> ClipSpec:
    key = ALIASES.get(name, name).lower()
    if key not in ARCHS:
        import difflib

        known = sorted(ARCHS) + sorted(ALIASES)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        from evaclip_cli.errors import UserError

        raise UserError(f"unknown model '{name}'{hint}; known: {', '.join(known)}")
    return ARCHS[key].model_copy(deep=True)


def named_arch(spec: ClipSpec) -> Optional[str]:
    """The released arch whose vision tower equals ``spec.vision`` exactly, if any."""
    for key, timm_name in TIMM_NAMES.items():
        if ARCHS[key].vision == spec.vision:
            return key
    return None


# --------------------------------------------------------------------------------------------------------------
# open_clip model_cfg
# --------------------------------------------------------------------------------------------------------------
def open_clip_model_cfg(spec: ClipSpec) -> dict:
    """open_clip's ``model_cfg`` for a spec: timm vision tower + open_clip text tower (CustomTextCLIP).

    Released towers are named (``eva02_enormous_patch14_clip_224`` loads in plain open_clip); any other tower
    is the generic ``evaclip_vit`` plus ``timm_model_kwargs`` (the field open_clip's main branch added for this),
    honoured by open_clip 3.3 once ``evaclip_cli`` is imported.
    """
    v = spec.vision
    vision_cfg: dict = dict(
        image_size=v.image_size,
        timm_model_name=GENERIC_TIMM_NAME,
        timm_model_pretrained=False,
        timm_pool="token",
        timm_proj="linear",
        timm_proj_bias=v.has_head_bias,
    )
    key = named_arch(spec)
    if key is not None:
        vision_cfg["timm_model_name"] = TIMM_NAMES[key]
    else:
        vision_cfg["timm_model_kwargs"] = v.timm_kwargs()
    return dict(embed_dim=spec.embed_dim, vision_cfg=vision_cfg, text_cfg=spec.text.open_clip_cfg(), custom_text=True)


def spec_from_open_clip_cfg(cfg: dict) -> ClipSpec:
    """Inverse of :func:`open_clip_model_cfg` (used by convert --to eva and estimate on folders)."""
    from evaclip_cli.errors import UserError

    cfg = cfg.get("model_cfg", cfg)
    vc, tc = cfg["vision_cfg"], cfg["text_cfg"]
    name = vc.get("timm_model_name")
    kw = vc.get("timm_model_kwargs")
    if kw:
        vision = VisionSpec(
            image_size=kw.get("img_size", vc.get("image_size", 224)), patch_size=kw["patch_size"],
            width=kw["embed_dim"], depth=kw["depth"], heads=kw["num_heads"],
            mlp_dim=round(kw["mlp_ratio"] * kw["embed_dim"]) if not kw.get("swiglu_mlp") else
            int(kw["mlp_ratio"] * kw["embed_dim"]),
            norm=kw.get("norm", "layer"), qkv_bias=kw.get("qkv_bias", True), qkv_fused=kw.get("qkv_fused", True),
            post_norm=kw.get("use_post_norm", False), rope=kw.get("use_rot_pos_emb", False),
            swiglu=kw.get("swiglu_mlp", False), subln=kw.get("scale_attn_inner", False),
            rope_ref_size=(kw.get("ref_feat_shape") or [None])[0],
            head_bias=vc.get("timm_proj_bias", False),
        )
    else:
        keys = [k for k, n in TIMM_NAMES.items() if n == name]
        if not keys:
            raise UserError(f"open_clip config names timm model '{name}', which evaclip does not describe; "
                            "use an evaclip-written folder")
        vision = ARCHS[keys[0]].vision.model_copy(update=dict(image_size=vc.get("image_size", 224)))
    text = TextSpec(width=tc["width"], heads=tc["heads"], layers=tc["layers"],
                    context_length=tc.get("context_length", 77), vocab_size=tc.get("vocab_size", 49408),
                    mlp_ratio=tc.get("mlp_ratio", 4.0))
    return ClipSpec(embed_dim=cfg["embed_dim"], vision=vision, text=text)


# --------------------------------------------------------------------------------------------------------------
# The reference repo's JSON schema (baaivision/EVA eva_clip/model_configs/*.json)
# --------------------------------------------------------------------------------------------------------------
def spec_from_eva_config(cfg: dict, where: str = "config") -> ClipSpec:
    from evaclip_cli.errors import UserError

    try:
        vc, tc = cfg["vision_cfg"], cfg["text_cfg"]
        width = int(vc["width"])
        head_width = int(vc.get("head_width", 64))
        mlp_ratio = float(vc.get("mlp_ratio", 4.0))
        swiglu = bool(vc.get("naiveswiglu", False) or vc.get("swiglu", False))
        mlp_dim = int(width * mlp_ratio)
        image_size = vc.get("image_size", 224)
        patch = int(vc.get("patch_size", 16))
        rope = bool(vc.get("rope", False))
        vision = VisionSpec(
            image_size=int(image_size if isinstance(image_size, int) else image_size[0]),
            patch_size=patch,
            width=width,
            depth=int(vc["layers"]),
            heads=width // head_width,
            mlp_dim=mlp_dim,
            norm="rms" if vc.get("use_rms_norm", False) else "layer",
            qkv_bias=bool(vc.get("qkv_bias", True)),
            # rei's B/16 code keeps separate q/k/v projections whenever subln is set
            qkv_fused=not bool(vc.get("subln", False)),
            post_norm=bool(vc.get("postnorm", False)),
            rope=rope,
            swiglu=swiglu,
            subln=bool(vc.get("subln", False)),
            rope_ref_size=(int(vc.get("pt_hw_seq_len", 16)) if rope else None),
        )
        text = TextSpec(width=int(tc["width"]), heads=int(tc["heads"]), layers=int(tc["layers"]),
                        context_length=int(tc.get("context_length", 77)), vocab_size=int(tc.get("vocab_size", 49408)))
        return ClipSpec(embed_dim=int(cfg["embed_dim"]), vision=vision, text=text)
    except KeyError as e:
        raise UserError(f"{where}: missing key {e} (expected the EVA model-config schema: embed_dim, vision_cfg, "
                        "text_cfg)") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: invalid value ({e})") from None


def eva_config_from_spec(spec: ClipSpec) -> dict:
    v, t = spec.vision, spec.text
    return {
        "embed_dim": spec.embed_dim,
        "vision_cfg": {
            "image_size": v.image_size, "layers": v.depth, "width": v.width, "head_width": v.width // v.heads,
            "mlp_ratio": v.mlp_ratio, "patch_size": v.patch_size, "eva_model_name": "evaclip",
            "drop_path_rate": 0, "qkv_bias": v.qkv_bias, "xattn": True, "postnorm": v.post_norm,
            "fusedLN": False, "use_rms_norm": v.norm == "rms", "rope": v.rope,
            "pt_hw_seq_len": v.rope_ref_size or v.grid, "intp_freq": v.rope, "naiveswiglu": v.swiglu,
            "subln": v.subln,
        },
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers, "xattn": False, "fusedLN": False},
    }
