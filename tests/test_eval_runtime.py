"""The eval commands' setup (eval/runtime.py on engine.dist.setup_inference): a bare process stays single, with no
process group (eval and embed run without torchrun), and the CPU is its device."""
import torch.distributed as tdist

from evaclip_cli.engine.dist import setup_inference
from evaclip_cli.eval.runtime import setup_dist


def test_a_bare_process_is_a_world_of_one_without_a_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = setup_inference()
    assert (info.rank, info.world_size, info.local_rank, info.device) == (0, 1, 0, "cpu")
    assert setup_dist() == (0, 1, "cpu")
    assert not tdist.is_initialized()
