"""The 18B (or 8B) recipe at its real widths, cut only in depth, through the whole lifecycle on this machine.

Every width, head count, MLP size, norm and post-norm flag is the paper's; only the number of vision blocks and
text layers is cut (``--depth``, ``--text-layers``: 1 and 1 make 0.46B parameters at 18B widths, what fits two
ranks in 24 GB in fp32). ZeRO-3 on 2 ranks, LAMB, micro batch 2, the demo data, in one precision (``--precision``);
no eval during training (one 5120-wide image takes ~4 s on a core here; at the recipe's eval batch of 256 one MLP
activation alone is ~7 GB in fp32):

  A  an uninterrupted run of 5 steps (checkpoint every 3 and at the end; final/ exported at the end);
  B  the same run killed with SIGKILL (launcher, ranks, workers) once its step-3 checkpoint is complete, then
     ``--resume auto`` to step 5: its steps 4-5 losses and its final/ weights against A's (--smoke: 40 steps);
  C  ``evaclip convert`` of B's checkpoint to an open_clip folder (streamed: peak anonymous memory against the
     largest output tensor and shard), then ``evaclip eval zeroshot`` of it on the demo's shapes set;
  M  every rank's memory: sampled peak anonymous memory (every 20 ms) and the phases the run itself records
     (memory.json: before the model, after zero.Init, after DeepSpeed's initialisation, after the first optimizer
     step), beside what ``evaclip estimate --gpus 2`` predicts for the same recipe and overrides.

    python bench/scale_rehearsal.py [--arch 18b|8b] [--precision fp32|bf16] [--depth 1] [--text-layers 1]
                                    [--dir /tmp] [--keep] [--json OUT]

Needs the whole machine (both ranks of 18B widths at depth 1 hold ~9 GB each; 8-10 minutes per case in fp32 on
2 cores): run it alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EVACLIP = [sys.executable, "-m", "evaclip_cli.cli"]
GB = 1e9


def _status(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, v = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                out[key] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _children(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _rank(pid: int):
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


class Sampler:
    """Peak anonymous memory of every rank (processes under the launched command that have RANK set)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.peaks, self.stop = proc, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        ranks: dict[int, int] = {}
        while not self.stop.is_set() and self.proc.poll() is None:
            for pid in _children(self.proc.pid):
                if pid not in ranks:
                    r = _rank(pid)
                    if r is not None and _rank(_parent(pid)) is None:  # a rank, not one of its data workers
                        ranks[pid] = r
            for pid, r in ranks.items():
                anon = _status(pid).get("RssAnon", 0)
                self.peaks[r] = max(self.peaks.get(r, 0), anon)
            time.sleep(0.02)

    def done(self) -> dict:
        self.stop.set()
        self.thread.join()
        return self.peaks


def overrides(a, demo: Path) -> list[str]:
    from evaclip_cli.stages.common import shard_pattern

    # the demo shards as a plain data source: no in-training eval (5 steps of a random model; eval is C's)
    return [f"model.vision.depth={a.depth}", f"model.text.layers={a.text_layers}",
            f"deepspeed.precision={a.precision}", "data.micro_batch=2", "data.global_batch=4",
            f"data.samples={4 * a.steps}",
            f'data.train=[{{shards="{shard_pattern(demo / "train")}"}}]', "data.workers=1", "logging.log_every=1",
            "logging.checkpoint_every=3",
            "logging.keep_last=2", "eval.every_steps=0", "schedule.warmup_steps=1", "compute.threads=1",
            # memory from a random init: the recipe's released inits (EVA-18B, E/14+'s text tower) are not fetched
            'init.vision=""', 'init.text=""',
            *(SMOKE if a.smoke else [])]


# --smoke: toy widths through the same script (tests/test_scale_rehearsal.py), to keep the bench runnable
SMOKE = ["model.vision.width=64", "model.vision.mlp_dim=256", "model.vision.heads=2", "model.text.width=64",
         "model.text.heads=2", "model.embed_dim=32"]


def train(a, out: Path, env: dict, resume: bool = False, kill_at: int = 0) -> tuple[int, dict, float]:
    cmd = [*EVACLIP, "train", "--recipe", a.arch, "--nproc", "2", "--out", str(out), *overrides(a, a.demo)]
    if resume:
        cmd += ["--resume", "auto"]
    t = time.perf_counter()
    log = open(out.parent / f"{out.name}{'-resume' if resume else ''}.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sampler = Sampler(proc)
    from evaclip_cli.engine.resume import list_complete

    while proc.poll() is None:
        if kill_at and any(step >= kill_at for step, _ in list_complete(out / "checkpoints")):
            # the whole job: torchrun starts each rank in a session of its own, so the launcher's group is not it
            for pid in [proc.pid, *_children(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            break
        time.sleep(0.2)
    peaks = sampler.done()
    if not kill_at and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log.name}")
    return proc.returncode, peaks, time.perf_counter() - t


def losses(out: Path) -> dict:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def peak_of(cmd: list[str], env: dict) -> tuple[float, float]:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _status(proc.pid).get("RssAnon", 0))
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return peak / GB, time.perf_counter() - t


def memory_report(mem: list, est: dict, peaks: dict) -> float:
    """Each rank's measured phases beside the estimate for the same recipe and world size; returns measured /
    estimated model + optimizer states of rank 0.

    Compared: ``step1 - start`` (model + optimizer states after the first step: activations are freed by then)
    with the estimate's weights + grads + optimizer states; the gradient bucket is shown apart (it is sized for the
    GPU config in the estimate, 5e7 elements on CPU, and only pages DeepSpeed has written count on CPU). The peak
    (sampled, minus the process's baseline) with the estimate's states + gather + step fp32 grads + activations."""
    st = next(s for s in est["memory"]["stages"] if s["zero_stage"] == est["memory"]["zero_stage"])
    states_est = st["weights_bytes"] + st["grads_bytes"] + st["optimizer_bytes"]
    act = est["memory"]["activations"]["checkpointed"]["total_bytes"]
    print(f"\nM  memory per rank, GB (ZeRO-{st['zero_stage']}): measured (memory.json, sampled peak) vs "
          f"evaclip estimate --gpus {est['cluster']['gpus']}")
    print(f"   estimate: weights {st['weights_bytes'] / GB:.2f} + grads {st['grads_bytes'] / GB:.2f} + optimizer "
          f"{st['optimizer_bytes'] / GB:.2f} = states {states_est / GB:.2f}; step buffers: gather "
          f"{st.get('gather_bytes', 0) / GB:.2f}, step fp32 grads {st.get('step_grads_bytes', 0) / GB:.2f}, bucket "
          f"{st.get('bucket_bytes', 0) / GB:.2f} (GPU config); "
          f"activations {act / GB:.2f}")
    ratio = 0.0
    for r in mem:
        p = r["points_bytes"]
        states = p["step1"] - p["start"]
        peak = peaks.get(r["rank"], 0) or r["peak_bytes"]
        if r["rank"] == 0:
            ratio = states / states_est
        print(f"   rank {r['rank']}: states {states / GB:.2f} (zero.Init {(p['model'] - p['start']) / GB:.2f}, "
              f"DeepSpeed init {(p['engine'] - p['model']) / GB:.2f}, first step {(p['step1'] - p['engine']) / GB:.2f})"
              f" = {states / states_est:.3f} x estimate; peak {(peak - p['start']) / GB:.2f} above the baseline vs "
              f"estimate {(states_est + st.get('gather_bytes', 0) + st.get('step_grads_bytes', 0) + act) / GB:.2f}"
              + (f"; held at the export {(p['released'] - p['start']) / GB:.2f}" if "released" in p else ""))
    print(f"   measured / estimated model + optimizer states (rank 0): {ratio:.3f}  (goal: within 10%)")
    return ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="18b", choices=["18b", "8b"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--text-layers", type=int, default=1)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--smoke", action="store_true", help="toy widths: checks the script, not memory")
    a = p.parse_args()
    a.steps = 40 if a.smoke else 5  # toy steps are quick: enough of them that the kill lands before the end

    work = Path(tempfile.mkdtemp(prefix=f"rehearsal-{a.arch}-{a.precision}-", dir=a.dir))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "EVACLIP_DEMO_DIR": str(work / "demo"), "PYTHONPATH": str(ROOT)}
    from evaclip_cli.data.demo import make_demo

    make_demo(work / "demo", n_train=640, n_val=64, per_class=2, n_videos=0)  # 16 eval images: ~4 s each here
    a.demo = work / "demo"
    res: dict = {"arch": a.arch, "precision": a.precision, "depth": a.depth, "text_layers": a.text_layers}
    try:
        est = json.loads(subprocess.run([*EVACLIP, "estimate", "--recipe", a.arch, "--gpus", "2", "--json",
                                         *overrides(a, a.demo)], env=env, cwd=ROOT, capture_output=True, text=True,
                                        check=True).stdout)
        res["params"] = est["params"]["trainable"]
        print(f"{a.arch} {'toy' if a.smoke else 'real'} widths, {a.depth} vision block(s), {a.text_layers} text "
              f"layer(s): {res['params']:,} parameters; ZeRO-3, 2 ranks, {a.precision}, LAMB, micro batch 2",
              flush=True)

        _, peaks_a, t_a = train(a, work / "A", env)
        print(f"A  uninterrupted {a.steps} steps: {t_a:.0f} s", flush=True)
        code, _, t_b1 = train(a, work / "B", env, kill_at=3)
        killed_at = max(losses(work / "B"))
        _, peaks_b, t_b2 = train(a, work / "B", env, resume=True)
        la, lb = losses(work / "A"), losses(work / "B")
        diff = max(abs(la[s] - lb[s]) for s in range(4, a.steps + 1))
        print(f"B  killed (exit {code}) after its step-3 checkpoint, at step {killed_at} ({t_b1:.0f} s), resumed to "
              f"{a.steps} ({t_b2:.0f} s): losses 4-{a.steps} vs A's: max diff {diff:.2e} (steps 4, 5: {lb[4]:.6f} "
              f"{lb[5]:.6f} vs {la[4]:.6f} {la[5]:.6f})", flush=True)
        from evaclip_cli.checkpoints.io import load_state_dict

        fa = load_state_dict(work / "A" / "final" / "open_clip_model.safetensors")
        fb = load_state_dict(work / "B" / "final" / "open_clip_model.safetensors")
        wdiff = max(float((fa[k] - fb[k]).abs().max()) for k in fa)
        print(f"   final/ of A and B: max weight diff {wdiff:.2e} over {len(fa)} tensors", flush=True)
        largest = max(t.numel() * t.element_size() for t in fa.values())
        del fa, fb

        conv = work / "C"
        peak_c, t_c = peak_of([*EVACLIP, "convert", str(work / "B" / "checkpoints"), str(conv), "--from", "deepspeed",
                               "--max-shard-size", "1GB"], env)
        shard = max(f.stat().st_size for f in conv.glob("*.safetensors"))
        print(f"C  convert --from deepspeed: {t_c:.0f} s, peak anonymous memory {peak_c:.2f} GB (largest tensor "
              f"{largest / GB:.2f} GB, largest shard {shard / GB:.2f} GB, checkpoint "
              f"{sum(f.stat().st_size for f in (work / 'B' / 'checkpoints').rglob('*.pt')) / GB:.2f} GB)", flush=True)
        zs = work / "demo" / "zeroshot" / "shapes"
        subprocess.run([*EVACLIP, "eval", "zeroshot", "-m", str(conv), "-d", str(zs), "--split", "test",
                        "--classnames", str(zs / "classnames.txt"), "--templates", str(zs / "templates.txt"),
                        "-o", str(work / "eval.json")], env=env, cwd=ROOT, check=True, capture_output=True)
        ev = json.loads((work / "eval.json").read_text())
        print(f"   eval zeroshot (demo shapes): {json.dumps(ev.get('metrics', ev))[:160]}", flush=True)

        # ---- memory: measured vs estimated
        mem = json.loads((work / "A" / "memory.json").read_text())["ranks"]
        ratio = memory_report(mem, est, peaks_a)
        res.update(killed_at_step=killed_at, t_a=t_a, t_b=t_b1 + t_b2, loss_diff=diff, weight_diff=wdiff,
                   convert_peak_gb=peak_c, largest_tensor_gb=largest / GB, largest_shard_gb=shard / GB, eval=ev,
                   memory=mem,
                   sampled_peak_gb={str(k): v / GB for k, v in peaks_a.items()},
                   sampled_peak_resume_gb={str(k): v / GB for k, v in peaks_b.items()},
                   states_ratio=ratio)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
