"""Architecture specs of the EVA-CLIP family: plain data, no torch import.

A spec is the one description of a model that every part of evaclip reads: timm kwargs for the vision tower,
open_clip's ``model_cfg`` for the whole CLIP, the reference repo's JSON schema for ``convert``, parameter and
FLOP counts for ``estimate``.
"""
from __future__ import annotations

import re
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
    norm_eps: float = 1e-6  # every norm of the tower (the reference's 1e-6; BAAI's HF configs may say otherwise)

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
        if self.norm_eps != 1e-6:  # written only when it differs, so existing folders stay as they are
            kw.update(norm_eps=self.norm_eps)
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
    norm_eps: float = 1e-5  # open_clip's LayerNorm default

    def open_clip_cfg(self) -> dict:
        cfg: dict[str, Any] = dict(context_length=self.context_length, vocab_size=self.vocab_size,
                                   width=self.width, heads=self.heads, layers=self.layers)
        if self.mlp_ratio != 4.0:
            cfg["mlp_ratio"] = self.mlp_ratio
        if self.norm_eps != 1e-5:
            cfg["norm_kwargs"] = {"eps": self.norm_eps}
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
    # EVA02-CLIP-L/14 (BAAI's EVA02_CLIP_L_psz14_s4B.pt; open_clip's EVA02-L-14): B/16's block at L width.
    "l14": ClipSpec(
        embed_dim=768,
        vision=VisionSpec(patch_size=14, width=1024, depth=24, heads=16, mlp_dim=2730, norm="layer",
                          qkv_bias=True, qkv_fused=False, rope=True, swiglu=True, subln=True, rope_ref_size=16),
        text=TextSpec(width=768, heads=12, layers=12),
    ),
    # EVA02-CLIP-E/14 (EVA02_CLIP_E_psz14_s4B.pt; open_clip's EVA02-E-14): the 5B's vision, ViT-H/14's text tower.
    "e14": ClipSpec(
        embed_dim=1024,
        vision=VisionSpec(patch_size=14, width=1792, depth=64, heads=16, mlp_dim=15360, norm="layer",
                          qkv_bias=True, post_norm=True),
        text=TextSpec(width=1024, heads=16, layers=24),
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
    "EVA02-CLIP-L-14": "l14",
    "EVA02-CLIP-bigE-14": "e14",
    "EVA02-CLIP-E-14": "e14",
}

# Total parameter counts of the released models (reference code, built on the meta device).
REFERENCE_PARAMS = {"18b": 18_325_482_241, "8b": 8_220_748_545, "5b": 5_044_889_089, "b16": 149_691_137,
                    # open_clip 3.3's EVA02-L-14 / EVA02-E-14 built on the meta device (BAAI's card: 428M, 4.7B)
                    "l14": 427_755_457, "e14": 4_704_589_569}

# timm names: the EVA-CLIP-8B/18B towers are registered by evaclip; 5B and B/16 are timm's own.
TIMM_NAMES = {
    "18b": "evaclip_18b_patch14_224",
    "8b": "evaclip_8b_patch14_224",
    "5b": "eva02_enormous_patch14_clip_224",
    "b16": "eva02_base_patch16_clip_224",
    "l14": "eva02_large_patch14_clip_224",
    "e14": "eva02_enormous_patch14_clip_224",  # the 5B's vision tower
}
GENERIC_TIMM_NAME = "evaclip_vit"


def resolve_arch(name: str) -> ClipSpec:
    """evaclip's short name, a reference config name, a released checkpoint's name, an open_clip pretrained tag
    (``open_clip:EVA02-E-14-plus/laion2b_s9b_b144k``) or an open_clip model name (``EVA02-L-14``) -> the spec."""
    if name in RELEASED:  # a released checkpoint's name (EVA-CLIP-8B-448: the 8B at 448 px)
        return RELEASED[name].spec()
    key = ALIASES.get(name, name).lower()
    if key not in ARCHS:
        tag = parse_open_clip_tag(name)
        from_open_clip = open_clip_spec(tag[0] if tag else name)
        if from_open_clip is not None:
            return from_open_clip
        import difflib

        known = sorted(ARCHS) + sorted(ALIASES) + sorted(set(RELEASED) - set(ALIASES))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        from evaclip_cli.errors import UserError

        raise UserError(f"unknown model '{name}'{hint}; known: {', '.join(known)}")
    return ARCHS[key].model_copy(deep=True)


OPEN_CLIP_PREFIX = "open_clip:"
_OPEN_CLIP_BODY = re.compile(r"(?P<model>[A-Za-z0-9][\w.+-]*)[/:](?P<tag>[A-Za-z0-9][\w.-]*)")
_NOT_MODELS = ("hf-hub", "local-dir", "http", "https", "file", "s3", "gs", "pipe")


def parse_open_clip_tag(text: str) -> Optional[tuple[str, str]]:
    """(MODEL, TAG) of an open_clip pretrained tag: ``open_clip:MODEL/TAG`` (or ``open_clip:MODEL:TAG``), or the
    ``MODEL:TAG`` that open_clip itself prints (``open_clip.list_pretrained(as_str=True)``); None for anything else.
    Syntax only: whether open_clip knows the tag is checked when it is resolved."""
    text = str(text)
    if text.startswith(OPEN_CLIP_PREFIX):
        m = _OPEN_CLIP_BODY.fullmatch(text[len(OPEN_CLIP_PREFIX):])
    else:
        m = _OPEN_CLIP_BODY.fullmatch(text) if text.count(":") == 1 and "/" not in text else None
        if m and m.group("model").lower() in _NOT_MODELS:
            m = None
    return (m.group("model"), m.group("tag")) if m else None


def open_clip_spec(model: str) -> Optional[ClipSpec]:
    """The spec of an open_clip model name (its ``model_configs/*.json``), None when open_clip has no such model;
    one line when its towers are not EVA towers evaclip can build (e.g. ViT-B-32: evaluate it, not train it)."""
    import open_clip

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        return None
    if not cfg.get("vision_cfg", {}).get("timm_model_name") or not cfg.get("custom_text", False):
        from evaclip_cli.errors import UserError

        raise UserError(f"open_clip's {model} is not built of EVA towers evaclip describes; `evaclip eval` takes it "
                        "(-m open_clip:MODEL/TAG), training and conversion need an EVA-CLIP architecture")
    return spec_from_open_clip_cfg(cfg)


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
            # timm_proj null: timm's own classifier Linear is the projection, with a bias
            head_bias=vc.get("timm_proj_bias", False) if vc.get("timm_proj") else True,
            norm_eps=kw.get("norm_eps", 1e-6),
        )
    else:
        keys = [k for k, n in TIMM_NAMES.items() if n == name]
        if not keys:
            raise UserError(f"open_clip config names timm model '{name}', which evaclip does not describe; "
                            "use an evaclip-written folder")
        vision = ARCHS[keys[0]].vision.model_copy(update=dict(image_size=vc.get("image_size", 224)))
    text = TextSpec(width=tc["width"], heads=tc["heads"], layers=tc["layers"],
                    context_length=tc.get("context_length", 77), vocab_size=tc.get("vocab_size", 49408),
                    mlp_ratio=tc.get("mlp_ratio", 4.0), norm_eps=(tc.get("norm_kwargs") or {}).get("eps", 1e-5))
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


# --------------------------------------------------------------------------------------------------------------
# BAAI's transformers remote-code layout (config.json of BAAI/EVA-CLIP-8B, -8B-448, -18B)
# --------------------------------------------------------------------------------------------------------------
# The defaults of BAAI's EvaCLIPVisionConfig / EvaCLIPTextConfig / EvaCLIPConfig: a field missing from config.json
# means what BAAI's code makes of it.
HF_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=32, hidden_act="gelu", layer_norm_eps=1e-5, q_bias=True, k_bias=True, v_bias=True,
    post_layernorm=False, use_rms_norm=True)
HF_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, q_bias=True, k_bias=True, v_bias=True,
    post_layernorm=False, use_rms_norm=False)
HF_PROJECTION_DEFAULT = 512
# where --to hf points transformers for the model code (the copy evaclip's parity fixtures were measured against)
HF_REMOTE_CODE_REPO = "BAAI/EVA-CLIP-8B-448"


def _hf_fields(cfg: dict, key: str, defaults: dict, where: str) -> dict:
    from evaclip_cli.errors import UserError

    sub = cfg.get(key, {})
    if sub is None:
        sub = {}
    if not isinstance(sub, dict):
        raise UserError(f"{where}: '{key}' is not an object")
    return {k: sub.get(k, d) if sub.get(k) is not None else d for k, d in defaults.items()}


def spec_from_hf_config(cfg: dict, where: str = "config.json") -> ClipSpec:
    """BAAI's HF ``config.json`` -> ClipSpec, every architecture field read from the file (any size). Refuses, in one
    line, what the open_clip model cannot express (non-GELU activations, an RMSNorm or post-norm text tower)."""
    from evaclip_cli.errors import UserError

    v = _hf_fields(cfg, "vision_config", HF_VISION_DEFAULTS, where)
    t = _hf_fields(cfg, "text_config", HF_TEXT_DEFAULTS, where)
    try:
        for tower, f in (("vision", v), ("text", t)):
            if str(f["hidden_act"]).lower() != "gelu":
                raise UserError(f"{where}: {tower}_config.hidden_act '{f['hidden_act']}' is not supported (evaclip's "
                                "towers use exact GELU, as BAAI's EVA-CLIP does)")
            if int(f["hidden_size"]) % int(f["num_attention_heads"]):
                raise UserError(f"{where}: {tower}_config.hidden_size {f['hidden_size']} is not divisible by "
                                f"num_attention_heads {f['num_attention_heads']}")
        if t["use_rms_norm"] or t["post_layernorm"]:
            raise UserError(f"{where}: text_config with use_rms_norm/post_layernorm is not supported (open_clip's text "
                            "tower is pre-norm LayerNorm, as in every released EVA-CLIP)")
        if int(v["num_channels"]) != 3:
            raise UserError(f"{where}: vision_config.num_channels {v['num_channels']} (only RGB, 3, is supported)")
        if int(v["image_size"]) % int(v["patch_size"]):
            raise UserError(f"{where}: vision_config.image_size {v['image_size']} is not a multiple of patch_size "
                            f"{v['patch_size']}")
        width = int(v["hidden_size"])
        qkv_bias = bool(v["q_bias"] or v["v_bias"])  # k's bias is dropped (softmax ignores it), see keymaps
        vision = VisionSpec(
            image_size=int(v["image_size"]), patch_size=int(v["patch_size"]), width=width,
            depth=int(v["num_hidden_layers"]), heads=int(v["num_attention_heads"]),
            mlp_dim=int(v["intermediate_size"]), norm="rms" if v["use_rms_norm"] else "layer", qkv_bias=qkv_bias,
            post_norm=bool(v["post_layernorm"]),
            head_bias=None if not qkv_bias else False,  # visual_projection has no bias
            norm_eps=float(v["layer_norm_eps"]),
        )
        tw = int(t["hidden_size"])
        text = TextSpec(width=tw, heads=int(t["num_attention_heads"]), layers=int(t["num_hidden_layers"]),
                        context_length=int(t["max_position_embeddings"]), vocab_size=int(t["vocab_size"]),
                        mlp_ratio=int(t["intermediate_size"]) / tw, norm_eps=float(t["layer_norm_eps"]))
        return ClipSpec(embed_dim=int(cfg.get("projection_dim") or HF_PROJECTION_DEFAULT), vision=vision, text=text)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: invalid value in BAAI's config schema ({' '.join(str(e).split())[:200]})") from None


def hf_config_from_spec(spec: ClipSpec) -> dict:
    """config.json of BAAI's remote-code layout for ``spec`` (the fields BAAI's EvaCLIPConfig reads, an ``auto_map``
    to BAAI's code on the Hub). Raises ``UserError`` for towers the layout cannot describe."""
    from evaclip_cli.errors import UserError

    v, t = spec.vision, spec.text
    missing = [name for name, on in (("rope", v.rope), ("SwiGLU", v.swiglu), ("sub-LN", v.subln)) if on]
    if missing:
        raise UserError(f"BAAI's HF layout has no {'/'.join(missing)} (its blocks are plain pre/post-norm ViT "
                        "blocks); this model cannot be written with --to hf")
    code = HF_REMOTE_CODE_REPO
    return {
        "architectures": ["EvaCLIPModel"],
        "auto_map": {"AutoConfig": f"{code}--configuration_evaclip.EvaCLIPConfig",
                     "AutoModel": f"{code}--modeling_evaclip.EvaCLIPModel"},
        "model_type": "clip",
        "projection_dim": spec.embed_dim,
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
        "vision_config": {
            "model_type": "evaclip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "num_channels": 3,
            "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": "gelu",
            "layer_norm_eps": v.norm_eps, "q_bias": v.qkv_bias, "k_bias": False, "v_bias": v.qkv_bias,
            "post_layernorm": v.post_norm, "use_rms_norm": v.norm == "rms", "projection_dim": spec.embed_dim,
        },
        "text_config": {
            "model_type": "evaclip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
            "intermediate_size": int(t.width * t.mlp_ratio), "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads, "max_position_embeddings": t.context_length, "hidden_act": "gelu",
            "layer_norm_eps": t.norm_eps, "q_bias": True, "k_bias": True, "v_bias": True, "post_layernorm": False,
            "use_rms_norm": False, "projection_dim": spec.embed_dim,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
        },
    }


def is_hf_config(cfg: dict) -> bool:
    """A BAAI EVA-CLIP remote-code config.json (not a plain transformers CLIP, not a timm folder)."""
    if not isinstance(cfg, dict) or "architecture" in cfg:
        return False
    if not isinstance(cfg.get("vision_config"), dict) or not isinstance(cfg.get("text_config"), dict):
        return False
    code = str(cfg.get("auto_map", "")) + str(cfg.get("architectures", ""))
    return ("evaclip" in code.lower() or cfg.get("model_type") == "evaclip"
            or cfg["vision_config"].get("model_type") == "evaclip_vision_model")


# --------------------------------------------------------------------------------------------------------------
# The released checkpoints: `evaclip convert EVA-CLIP-18B OUT` needs nothing else
# --------------------------------------------------------------------------------------------------------------
class Released(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    repo: str
    file: Optional[str]  # None: the repo's transformers remote-code layout (config.json + fp32 shards)
    layout: Literal["eva", "mim", "hf"]
    size: str  # as BAAI's model card gives it (the download is checked against what the Hub reports)
    params: int  # parameters of the model evaclip builds from it (MIM: the vision tower, without mask_token/lm_head)
    arch: str  # ARCHS key
    image_size: Optional[int] = None  # when it differs from the arch's (EVA-CLIP-8B-448)

    @property
    def source(self) -> str:
        return f"hf-hub:{self.repo}" + (f"/{self.file}" if self.file else "")

    def spec(self) -> ClipSpec:
        spec = ARCHS[self.arch].model_copy(deep=True)
        if self.image_size is not None:
            spec.vision.image_size = self.image_size
        return spec


# Files, sizes: BAAI's EVA-CLIP-18B model card (github.com/baaivision/EVA/tree/master/EVA-CLIP-18B); parameter
# counts built on the meta device (tests/test_hub_sources.py checks them against ARCHS).
RELEASED: dict[str, Released] = {
    "EVA-CLIP-18B": Released(repo="BAAI/EVA-CLIP-18B", file="EVA_CLIP_18B_psz14_s6B.fp16.pt", layout="eva",
                             size="36.7 GB", params=18_325_482_241, arch="18b"),
    "EVA-CLIP-8B": Released(repo="BAAI/EVA-CLIP-8B", file="EVA_CLIP_8B_psz14_s9B.pt", layout="eva",
                            size="32.9 GB", params=8_220_748_545, arch="8b"),
    "EVA-CLIP-8B-448": Released(repo="BAAI/EVA-CLIP-8B-448", file="EVA_CLIP_8B_psz14_plus_s0.6B.pt", layout="eva",
                                size="32.9 GB", params=8_223_894_273, arch="8b", image_size=448),
    "EVA-CLIP-18B-hf": Released(repo="BAAI/EVA-CLIP-18B", file=None, layout="hf", size="~73 GB (fp32 shards)",
                                params=18_325_482_241, arch="18b"),
    "EVA-CLIP-8B-hf": Released(repo="BAAI/EVA-CLIP-8B", file=None, layout="hf", size="~33 GB (fp32 shards)",
                               params=8_220_748_545, arch="8b"),
    "EVA-CLIP-8B-448-hf": Released(repo="BAAI/EVA-CLIP-8B-448", file=None, layout="hf", size="~33 GB (fp32 shards)",
                                   params=8_223_894_273, arch="8b", image_size=448),
    # the MIM encoders (vision only): distill's students, train's init.vision
    "EVA-18B": Released(repo="BAAI/EVA-CLIP-18B", file="EVA_18B_psz14.fp16.bin", layout="mim", size="35.3 GB",
                        params=17_622_630_400, arch="18b"),
    "EVA-8B": Released(repo="BAAI/EVA-CLIP-8B", file="EVA_8B_psz14.bin", layout="mim", size="30.1 GB",
                       params=7_520_845_824, arch="8b"),
    # the EVA02-CLIP family (BAAI's EVA-CLIP README: QuanSun/EVA-CLIP holds every .pt, the sizes are its card's).
    # EVA02-CLIP-E/14+ is the 18B's MIM teacher and its text tower's init (EVA-CLIP-18B README). open_clip serves
    # the same weights converted: open_clip:EVA02-E-14-plus/laion2b_s9b_b144k (see parse_open_clip_tag).
    "EVA02-CLIP-bigE-14-plus": Released(repo="QuanSun/EVA-CLIP", file="EVA02_CLIP_E_psz14_plus_s9B.pt",
                                        layout="eva", size="10.1 GB", params=5_044_889_089, arch="5b"),
    "EVA02-CLIP-E-14-plus": Released(repo="QuanSun/EVA-CLIP", file="EVA02_CLIP_E_psz14_plus_s9B.pt", layout="eva",
                                     size="10.1 GB", params=5_044_889_089, arch="5b"),
    "EVA02-CLIP-bigE-14": Released(repo="QuanSun/EVA-CLIP", file="EVA02_CLIP_E_psz14_s4B.pt", layout="eva",
                                   size="9.4 GB", params=4_704_589_569, arch="e14"),
    "EVA02-CLIP-E-14": Released(repo="QuanSun/EVA-CLIP", file="EVA02_CLIP_E_psz14_s4B.pt", layout="eva",
                                size="9.4 GB", params=4_704_589_569, arch="e14"),
    "EVA02-CLIP-L-14": Released(repo="QuanSun/EVA-CLIP", file="EVA02_CLIP_L_psz14_s4B.pt", layout="eva",
                                size="856 MB", params=427_755_457, arch="l14"),
    "EVA02-CLIP-L-14-336": Released(repo="QuanSun/EVA-CLIP", file="EVA02_CLIP_L_336_psz14_s6B.pt", layout="eva",
                                    size="856 MB", params=428_083_137, arch="l14", image_size=336),
    "EVA02-CLIP-B-16": Released(repo="QuanSun/EVA-CLIP", file="EVA02_CLIP_B_psz16_s8B.pt", layout="eva",
                                size="300 MB", params=149_691_137, arch="b16"),
}
