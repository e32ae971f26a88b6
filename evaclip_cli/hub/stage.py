"""What a push uploads, staged in a work folder: an open_clip folder as it is, a run folder's ``final/`` (or its
checkpoints, consolidated), or anything ``evaclip convert`` reads (converted on the way), plus tokenizer files."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from evaclip_cli.errors import UserError
from evaclip_cli.models.openclip_compat import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json",
                   "bpe_simple_vocab_16e6.txt.gz")


PICKLE_WEIGHTS = ("open_clip_pytorch_model.bin", "open_clip_model.bin", "pytorch_model.bin")


@dataclass
class Staged:
    """What one push uploads: path in the repo -> local file, plus what the card needs to know."""
    files: dict  # path_in_repo -> Path
    source: Path  # the open_clip folder the weights come from (converted or the user's)
    run_dir: Optional[Path]
    converted_from: Optional[str]  # source format when converted on the way


def _weight_files(folder: Path) -> list[str]:
    """The safetensors weight files of an open_clip folder (one file, or the shards its index names + the index)."""
    if (folder / WEIGHTS_NAME).is_file():
        return [WEIGHTS_NAME]
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise UserError(f"{index}: not a safetensors index ({type(e).__name__}); re-export the folder with "
                            "`evaclip convert`") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise UserError(f"{folder}: the index names shard(s) that are not there: {', '.join(missing[:3])}; "
                            "copy the whole folder or re-export it with `evaclip convert`")
        return [*shards, INDEX_NAME]
    return []


def _is_open_clip_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def _convert_into(src: Path, dst: Path, *, src_format: str, max_shard_size: str, dtype: Optional[str],
                  eva_config, model, recipe) -> None:
    from evaclip_cli.checkpoints.convert import run_convert

    run_convert(src, dst, src_format=src_format, dst_format="open_clip", eva_config=eva_config, model=model,
                recipe=recipe, dtype=dtype or "auto", max_shard_size=max_shard_size, force=True)
    if not _is_open_clip_folder(dst):  # a MIM checkpoint becomes a timm vision tower, not a CLIP
        raise UserError(f"{src}: holds a vision tower only (MIM/timm layout); `evaclip push` uploads CLIP models "
                        "(convert a CLIP checkpoint, or a run folder of `evaclip train`)")


def stage(src: Path, work: Path, *, max_shard_size: Optional[str] = None, dtype: Optional[str] = None,
          eva_config=None, model=None, recipe=None) -> Staged:
    """Decide what to upload from SRC; converts (into ``work``) when SRC is not an open_clip folder with
    safetensors weights, or when resharding / a dtype change is asked for."""
    from evaclip_cli.eval.report import find_run_dir

    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: no such file or directory")
    run_dir = find_run_dir(src)
    folder, convert_from, convert_src = None, None, src
    if run_dir is not None and src.resolve() in (run_dir.resolve(), (run_dir / "checkpoints").resolve()):
        if _is_open_clip_folder(run_dir / "final") and src.resolve() == run_dir.resolve():
            folder = run_dir / "final"
        else:
            convert_from, convert_src = "deepspeed", run_dir / "checkpoints"
            recipe = recipe or str(run_dir / "evaclip_recipe.toml")
            if not convert_src.is_dir():
                raise UserError(f"{run_dir}: a run folder with neither final/ nor checkpoints/; train it first")
    elif _is_open_clip_folder(src):
        folder = src
    else:
        from evaclip_cli.checkpoints.detect import detect_format

        convert_from = detect_format(src, "auto")
    if folder is not None:
        weights = _weight_files(folder)
        if not weights:
            if any((folder / n).is_file() for n in PICKLE_WEIGHTS):
                convert_from, convert_src = "open_clip", folder  # pickle weights: upload safetensors instead
            else:
                raise UserError(f"{folder}: an open_clip folder without weights ({WEIGHTS_NAME} or {INDEX_NAME})")
        elif max_shard_size is not None or dtype is not None:
            convert_from, convert_src = "open_clip", folder  # reshard / cast on the way
    if convert_from is not None:
        out = work / "converted"
        _convert_into(convert_src, out, src_format=convert_from, max_shard_size=max_shard_size or "5GB",
                      dtype=dtype, eva_config=eva_config, model=model, recipe=recipe)
        # tokenizer files travel with the weights they belong to
        if folder is not None:
            for name in TOKENIZER_FILES:
                if (folder / name).is_file():
                    shutil.copy2(folder / name, out / name)
        folder = out
    assert folder is not None  # a run's final/, an open_clip folder, or the conversion just made
    files = {CONFIG_NAME: folder / CONFIG_NAME}
    files.update({name: folder / name for name in _weight_files(folder)})
    files.update({name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()})
    return Staged(files, folder, run_dir, convert_from)
