"""Every option, argument, choice and completer that more than one command shares, defined once.

Each is a ``typing.Annotated`` alias: a command declares ``nproc: Nproc = 1`` and gets the option's name, help and
checks from here (the default stays in the signature, as Typer wants with ``Annotated``). Options one command alone
has stay with that command. Nothing here imports more than Typer; the completers import their lists lazily.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


# --------------------------------------------------------------------------------------------------- completers
def complete_recipe(incomplete: str) -> list[str]:
    from evaclip_cli.recipes import builtin_names

    return [n for n in builtin_names() if n.startswith(incomplete)]


def complete_model(incomplete: str) -> list[str]:
    from evaclip_cli.models.specs import ALIASES, ARCHS, RELEASED

    return [n for n in dict.fromkeys([*ALIASES, *RELEASED, *ARCHS]) if n.startswith(incomplete)]


def complete_suite(incomplete: str) -> list[str]:
    from evaclip_cli.eval.runner import suite_names

    return [n for n in suite_names() if n.startswith(incomplete)]


# ------------------------------------------------------------------------------------------------------ choices
class Launcher(str, Enum):
    torchrun = "torchrun"
    deepspeed = "deepspeed"
    slurm = "slurm"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


# ------------------------------------------------------------------------------------------------------ recipes
OVERRIDES_HELP = "Recipe overrides, section.key=value (e.g. optimizer.lr=1e-4 data.micro_batch=16)."

Recipe = Annotated[str, typer.Option("--recipe", "-r", help="Recipe name or path.", autocompletion=complete_recipe)]
Overrides = Annotated[Optional[list[str]], typer.Argument(help=OVERRIDES_HELP)]

# ------------------------------------------------------------------------------------- launching (training stages)
Nproc = Annotated[int, typer.Option("--nproc", min=1, help="Processes on this machine (one per GPU; CPU: gloo).")]
Nodes = Annotated[int, typer.Option("--nodes", min=1,
                                    help="Machines (torchrun per node with --node-rank/--master-addr).")]
NodeRank = Annotated[int, typer.Option("--node-rank", min=0, help="This machine's rank when --nodes > 1.")]
MasterAddr = Annotated[Optional[str], typer.Option("--master-addr", help="Address of node 0 (multi-node).")]
MasterPort = Annotated[Optional[int], typer.Option("--master-port",
                                                   help="Rendezvous port (default: a free one / 29500).")]
Hostfile = Annotated[Optional[Path], typer.Option(
    "--hostfile", help="DeepSpeed hostfile ('host slots=N' lines): launch on all hosts.")]
LauncherOpt = Annotated[Optional[Launcher], typer.Option(
    "--launcher", help="torchrun (default), deepspeed, or slurm (writes an sbatch script).")]
DryRunFlag = Annotated[bool, typer.Option("--dry-run",
                                      help="Print the resolved recipe and the launch command; run nothing.")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: logging.out_dir, "
                                                                 "runs/<recipe>).")]
Resume = Annotated[Optional[str], typer.Option(
    "--resume", help="'auto' (newest checkpoint of this run, if any) or a checkpoint path.")]
SkipMemoryCheck = Annotated[bool, typer.Option(
    "--skip-memory-check", help="Start even when the memory estimate (`evaclip estimate`) says a rank cannot fit in "
    "the memory available (free GPU memory; on CPU, available RAM / processes on this machine).")]
AcceptChanges = Annotated[bool, typer.Option(
    "--accept-changes", help="On --resume, apply changed schedule/data keys (samples, global batch, lr, ...) from "
    "the resumed step as a new segment; without it such a resume is refused. Model keys are always refused.")]

# ----------------------------------------------------------------------------------------------------- eval
Model = Annotated[str, typer.Option(
    "--model", "-m", help="open_clip folder, evaclip run folder, DeepSpeed checkpoint, BAAI's HF folder, EVA .pt "
    "(with --eva-config/--arch), hf-hub:OWNER/NAME\\[/FILE]\\[@REV] or a released name (EVA-CLIP-8B; downloaded into "
    "the Hugging Face cache), an open_clip pretrained tag (open_clip:EVA02-E-14-plus/laion2b_s9b_b144k), or an "
    "open_clip model name with --pretrained FILE or TAG.")]
Pretrained = Annotated[Optional[str], typer.Option(
    "--pretrained", help="Weights file (local, or hf-hub:OWNER/NAME/FILE) for an open_clip model name or a released "
    "EVA name given as --model, or an open_clip pretrained tag (-m EVA02-E-14-plus --pretrained laion2b_s9b_b144k, "
    "as open_clip's own command line takes it).")]
EvaConfig = Annotated[Optional[str], typer.Option("--eva-config",
                                                  help="Reference model config JSON for an EVA .pt.")]
Arch = Annotated[Optional[str], typer.Option(
    "--arch", help="Released name / evaclip arch of an EVA .pt or DeepSpeed checkpoint without a recipe.",
    autocompletion=complete_model)]
Output = Annotated[Optional[Path], typer.Option("--output", "-o",
                                                help="Write the metrics as JSON (CLIP_benchmark's names).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward.")]
Workers = Annotated[Optional[int], typer.Option(
    "--workers", min=0, help="DataLoader workers decoding images (default: CPUs, ≤8).")]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="auto: bf16 autocast on GPU, fp32 on CPU.")]
FastDecode = Annotated[bool, typer.Option(
    "--fast-decode", help="Let the JPEG decoder downscale (2/4/8x) while decoding large images: faster, numbers "
    "may differ slightly from CLIP_benchmark's.")]
Split = Annotated[str, typer.Option("--split",
                                    help="Split folder of a CLIP_benchmark wds/ dataset / caption JSON.")]
EvalNproc = Annotated[int, typer.Option(
    "--nproc", min=1, help="Data-parallel processes (one per GPU; torchrun, as `train`).")]
