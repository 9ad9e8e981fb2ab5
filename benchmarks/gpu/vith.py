"""The GPU kit's model part: ViT-H-14 unlearning steps under the deepspeed launcher beside plain
open_clip training steps of the same model and batch, run one after the other in one part.

    python -m benchmarks.gpu.vith --out vith.json --work DIR [--dry]

1. data: forget (circles) and retain (the other shapes) pairs, `BATCH` each, and a small eval set,
   rendered at 224 px by the engine's generator (`cliperase.engine.tools.synthetic`, size=224) and
   written as shards;
2. plain (a child process): the model built with random weights on the device (open_clip's
   init; built under `torch.device`, since building ViT-H on the CPU takes 25 s on 2 cores),
   saved as the run's `--pretrained` state dict (nothing can be downloaded there), then
   `PLAIN_STEPS` steps of open_clip's ClipLoss + fused AdamW under bf16 autocast with gradient
   checkpointing on 2 x BATCH random pairs (the same images per step as an unlearning step:
   BATCH forget + BATCH retain);
3. engine: `deepspeed --num_gpus 1 benchmarks/gpu/unlearn_peak.py` (launch/unlearn.py's CLI and
   torch's allocator peak) with `--zero-stage 3 --precision bf16 --grad-checkpointing`,
   `--batch-size BATCH`, logging every step.

Step time: the median over the steps after `WARMUP` (engine: 1 / steps_per_s of log.jsonl's
rows). `step_ratio` = engine / plain (goal <= 1.1). NVML is sampled by this process during
both (device-wide utilisation and memory); the run's report.json telemetry is kept as well.
GPU: ViT-H-14, BATCH 256 (README's memory plan: 256 + 256 pairs per GPU). Dry run (CPU, gloo):
tiny-vit, BATCH 4.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks.gpu import write_json

__all__ = ["main", "SETTINGS"]

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {  # [dry]
    False: dict(model="ViT-H-14", batch=256, px=224, n_eval=48, steps=6, plain_steps=6, warmup=2),
    True: dict(model="tiny-vit", batch=4, px=224, n_eval=12, steps=2, plain_steps=2, warmup=1),
}
FORGET_CLASS = "circle"
ENGINE_TIMEOUT_S = 600  # the kit's cap on the part ends it sooner


class NvmlSampler:
    """Device 0's utilisation and used memory every `interval_s` on a daemon thread, while it
    runs; `summary()` is {"available": False, "reason"} without NVML or a GPU."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s, self.samples, self.reason = interval_s, [], None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "NvmlSampler":
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as exc:  # noqa: BLE001 - no NVML, no GPU: say why, measure the rest
            self.reason = f"{type(exc).__name__}: {exc}"
            return self
        t0 = time.perf_counter()

        def loop():
            while not self._stop.wait(self.interval_s):
                util = pynvml.nvmlDeviceGetUtilizationRates(handle)
                mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
                self.samples.append((time.perf_counter() - t0, util.gpu, mem.used / 2**20))

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> Dict[str, object]:
        if self.reason or not self.samples:
            return {"available": False, "reason": self.reason or "no sample taken"}
        util = [s[1] for s in self.samples]
        return {"available": True, "interval_s": self.interval_s, "samples": len(util),
                "util_pct_mean": statistics.fmean(util), "util_pct_max": max(util),
                "mem_used_mib_max": max(s[2] for s in self.samples)}


def _register_engine_configs() -> None:
    """open_clip learns the engine's own architectures (tiny-vit) from its packaged JSON files."""
    from importlib.resources import files

    import open_clip

    open_clip.add_model_config(str(files("cliperase.engine") / "model_configs"))


def make_data(root: Path, batch: int, px: int, n_eval: int) -> Dict[str, object]:
    """`root/{forget,retain,eval}`: `batch` forget and retain pairs and `n_eval` eval images, px x px."""
    from cliperase.engine.tools import synthetic

    t0 = time.perf_counter()
    others = tuple(s for s in synthetic.SHAPES if s != FORGET_CLASS)
    synthetic.write_pairs(synthetic.generate(batch, 11, shapes=(FORGET_CLASS,), size=px, prefix="f-"), root / "forget")
    synthetic.write_pairs(synthetic.generate(batch, 12, shapes=others, size=px, prefix="r-"), root / "retain")
    synthetic.write_eval(synthetic.generate(n_eval, 13, size=px, prefix="e-"), root / "eval", synthetic.SHAPES)
    return {"seconds": time.perf_counter() - t0, "pairs_each": batch, "eval_images": n_eval, "px": px}


def plain_steps(model_name: str, batch: int, steps: int, warmup: int, ckpt: Path, *,
                require_cuda: bool) -> Dict[str, object]:
    """Build the model with random weights on the device, save it to `ckpt`, time `steps` plain
    open_clip steps on 2 x batch random pairs (see the module docstring). Raises RuntimeError
    without CUDA when `require_cuda`."""
    import open_clip
    import torch

    _register_engine_configs()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if require_cuda and dev != "cuda":
        raise RuntimeError("no CUDA device: the vith part needs a GPU (--dry for the CPU dry run)")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):  # device= too: create_model ends with model.to(device), "cpu" by default
        model = open_clip.create_model(model_name, device=dev)
    out: Dict[str, object] = {"device": dev, "build_s": time.perf_counter() - t0,
                              "params": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, ckpt)  # CPU tensors, as checkpoints ship
    out.update(save_s=time.perf_counter() - t0, checkpoint_bytes=ckpt.stat().st_size)
    model.train()
    model.set_grad_checkpointing(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    loss_fn = open_clip.loss.ClipLoss()
    cfg = open_clip.get_model_config(model_name)
    px, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"].get("context_length", 77)
    gen = torch.Generator(device=dev).manual_seed(0)
    images = torch.randn(2 * batch, 3, px, px, generator=gen, device=dev)
    tokens = torch.randint(1, cfg["text_cfg"].get("vocab_size", 49408), (2 * batch, ctx), generator=gen, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: List[float] = []
    with NvmlSampler() as nvml:
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            with torch.autocast(dev, dtype=torch.bfloat16):
                image_features, text_features, scale = model(images, tokens)[:3]
                loss = loss_fn(image_features, text_features, scale)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[warmup:])
    out.update(step_times_s=times, step_s=step_s, pairs_per_s=2 * batch / step_s, loss=float(loss), nvml=nvml.summary(),
               torch_peak_allocated_bytes=torch.cuda.max_memory_allocated() if dev == "cuda" else None,
               torch_peak_reserved_bytes=torch.cuda.max_memory_reserved() if dev == "cuda" else None)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_args(s: dict, data: Path, ckpt: Path, run: Path) -> List[str]:
    """launch/unlearn.py's arguments for the measured run."""
    return ["--model", s["model"], "--pretrained", str(ckpt), "--forget-data", str(data / "forget"),
            "--retain-data", str(data / "retain"), "--eval-data", str(data / "eval"), "--forget-classes", FORGET_CLASS,
            "--steps", str(s["steps"]), "--batch-size", str(s["batch"]), "--zero-stage", "3", "--precision", "bf16",
            "--grad-checkpointing", "--output-dir", str(run), "--no-progress", "--set", "log_every=1",
            "--set", "save_every=0", "--set", 'export_precision="bf16"']


class PartTimeout(Exception):
    """The kit's cap reached this part (SIGTERM): stop waiting, keep what the run wrote."""


def _on_sigterm(signum, frame):
    raise PartTimeout()


def engine_run(s: dict, data: Path, ckpt: Path, run: Path, log: Path) -> Dict[str, object]:
    """The unlearning run under the deepspeed launcher, 1 rank; its step times, telemetry and peak."""
    peak_file = run.parent / "engine-peak.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["GPU_CHECK_PEAK_JSON"] = str(peak_file)
    # The `deepspeed` command's own entry point, wherever pip put the script.
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(_free_port()),
           str(ROOT / "benchmarks" / "gpu" / "unlearn_peak.py"), *engine_args(s, data, ckpt, run)]
    out: Dict[str, object] = {"command": cmd, "rc": None}
    t0 = time.perf_counter()
    with NvmlSampler() as nvml, open(log, "w") as sink:
        try:
            out["rc"] = subprocess.run(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                       timeout=ENGINE_TIMEOUT_S).returncode
        except PartTimeout:  # the launcher and its rank got the same SIGTERM (one process group)
            out["interrupted"] = "SIGTERM: the kit's time cap"
    out.update(launcher_wall_s=time.perf_counter() - t0, nvml=nvml.summary())
    out.update(read_run(run, peak_file, s))
    if out["rc"] != 0:
        out["log_tail"] = log.read_text(errors="replace")[-4000:]
    return out


def read_run(run: Path, peak_file: Path, s: dict) -> Dict[str, object]:
    """Step times (log.jsonl), report.json's telemetry and the torch peak, as far as written."""
    out: Dict[str, object] = {}
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()] if (run / "log.jsonl").exists() else []
    out["step_times_s"] = [1.0 / r["steps_per_s"] for r in rows if r.get("steps_per_s")]
    if len(out["step_times_s"]) > s["warmup"]:
        out["step_s"] = statistics.median(out["step_times_s"][s["warmup"]:])
        out["pairs_per_s"] = 2 * s["batch"] / out["step_s"]
    if (run / "report.json").exists():
        report = json.loads((run / "report.json").read_text())
        out["report"] = {k: report.get(k) for k in ("wall_s", "train_s", "telemetry", "teacher")}
    if peak_file.exists():
        out["torch_peak"] = json.loads(peak_file.read_text())
    return out


def _plain_child(s: dict, ckpt: Path, out: Path) -> Dict[str, object]:
    """plain_steps in a fresh process, so its device memory is gone before the engine starts."""
    cmd = [sys.executable, "-m", "benchmarks.gpu.vith", "--plain", str(ckpt), "--out", str(out)]
    if s is SETTINGS[True]:
        cmd.append("--dry")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
    if proc.returncode != 0:
        return {"rc": proc.returncode, "error": proc.stderr[-4000:]}
    return json.loads(out.read_text())


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="result JSON, rewritten after every stage")
    p.add_argument("--work", type=Path, help="scratch folder for data, checkpoint and run (emptied by the caller)")
    p.add_argument("--dry", action="store_true", help="tiny-vit on CPU (the kit's dry run)")
    p.add_argument("--plain", type=Path, metavar="CKPT", help=argparse.SUPPRESS)  # the child of stage 2
    args = p.parse_args(argv)
    s = SETTINGS[args.dry]
    if args.plain:
        write_json(args.out, plain_steps(s["model"], s["batch"], s["plain_steps"], s["warmup"], args.plain,
                                         require_cuda=not args.dry))
        return 0
    if args.work is None:
        p.error("--work is required")
    args.work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    result: Dict[str, object] = {"part": "vith", "dry": args.dry, "settings": s}
    try:
        return _stages(s, args.work, args.out, result)
    except PartTimeout:
        result["interrupted"] = "SIGTERM: the kit's time cap"
        write_json(args.out, result)
        return 1


def _stages(s: dict, work: Path, out: Path, result: Dict[str, object]) -> int:
    result["data"] = make_data(work / "data", s["batch"], s["px"], s["n_eval"])
    write_json(out, result)
    ckpt = work / "random-init.pt"
    result["plain"] = _plain_child(s, ckpt, work / "plain.json")
    write_json(out, result)
    if "step_s" not in result["plain"]:
        return 1
    result["engine"] = engine_run(s, work / "data", ckpt, work / "run", work / "engine.log")
    if "step_s" in result["engine"]:
        result["step_ratio"] = result["engine"]["step_s"] / result["plain"]["step_s"]
    write_json(out, result)
    return 0 if result["engine"]["rc"] == 0 and "step_ratio" in result else 1

if __name__ == "__main__":
    raise SystemExit(main())
