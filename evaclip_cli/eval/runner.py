"""The eval commands' entry points (interim re-exports; the eval redesign replaces this module)."""
from evaclip_cli.eval.core import run_retrieval, run_suite, run_zeroshot, suite_names
from evaclip_cli.stages.video import run_eval_video as run_video

__all__ = ["run_zeroshot", "run_retrieval", "run_video", "run_suite", "suite_names"]
