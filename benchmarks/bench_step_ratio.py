"""The cliperase step against a plain CLIP training step: same model, pairs, data and machine.

    MALLOC_MMAP_THRESHOLD_=131072 nice -n 10 .venv/bin/python benchmarks/bench_step_ratio.py \
        --model ViT-B-32 --pairs 8 --reps 12 --out benchmarks/results/cpu-step-ratio.json

One process holds one model (random init, saved as an open_clip state dict and loaded through
`--pretrained FILE`, as a real run is) and times two steps on it, alternately (ABBA order, so a
drift in the shared machine's load falls on both):

- plain: what open_clip's training loop does per step: `model(images, texts)`,
  `open_clip.loss.ClipLoss`, `backward()`, `AdamW.step()`, `zero_grad(set_to_none=True)`, over
  `--pairs` image-text pairs;
- cliperase: the engine's own step, `UnlearnRecipe._optimizer_step` after `UnlearnRecipe.setup()`
  (teacher cache built over the retain shards; the teacher model is gone by then), over
  `--pairs / 2` forget + `--pairs / 2` retain pairs: the recipe runs its towers once over the
  concatenation, so both steps push the same number of pairs through the same model.

Both read their batches from the engine's loader (`UnlearnRecipe._batches`, in-process: no
worker competes for the two cores), both use the same `torch.optim.AdamW(fused=True)` instance
(`trainer.make_optimizer`, through the recipe's stepper): one ViT-B-32 with AdamW state is
2.3 GiB, a second optimizer would not fit the memory this benchmark may use. The logit scale is
frozen (the engine's default), so both train the same parameters.

After the timed reps, one step of each runs under `torch.profiler` and its top operators by self
CPU time are recorded, with a per-phase split (data, forward, loss, backward, optimizer) of a few
extra reps of each. MALLOC_MMAP_THRESHOLD_ makes freed tensors (the teacher after the cache
pass) go back to the OS, so the peak RSS recorded is the training's own.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `benchmarks` is then not importable by itself
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks._registry import _status_bytes, environment  # noqa: E402


def _data(root: Path, n_train: int) -> Path:
    from cliperase.engine.tools.synthetic import write_default

    data = root / "data"
    write_default(data, forget=lambda s: s.shape == "circle", n_train=n_train, n_eval=24, seed=1)
    return data


def _checkpoint(model: str, path: Path) -> None:
    from cliperase.engine.checkpoint import export_open_clip
    from cliperase.engine.models import load_model

    torch.manual_seed(0)
    export_open_clip(load_model(model).model, path)


class Phases:
    """Process CPU seconds per named phase of one step."""

    def __init__(self):
        self.t: Dict[str, float] = {}
        self._last = time.process_time()

    def mark(self, name: str) -> None:
        now = time.process_time()
        self.t[name] = self.t.get(name, 0.0) + now - self._last
        self._last = now


def plain_step(model, loss_fn, optimizer, streams, phases: Phases = None) -> None:
    """One plain CLIP training step: both streams' batches concatenated, ClipLoss, AdamW."""
    phases = phases or Phases()
    batches = [next(s) for s in streams]
    images = torch.cat([b[0] for b in batches])
    texts = torch.cat([b[1] for b in batches])
    phases.mark("data")
    img, txt, scale = model(images, texts)
    phases.mark("forward")
    loss = loss_fn(img, txt, scale)
    phases.mark("loss")
    loss.backward()
    phases.mark("backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    phases.mark("optimizer")


def cliperase_step(recipe, step: int, phases: Phases = None) -> None:
    """`UnlearnRecipe._optimizer_step` (no log step), in its phases when `phases` is given."""
    if phases is None:
        recipe._optimizer_step(step, log_step=False)
        recipe.losses.next_step()
        return
    # The body of _optimizer_step for accum_steps == 1, with _loss_step's parts timed.
    r = recipe
    batches = {name: next(timed) for name, timed in r.timed.items()}
    images = torch.cat([b[0] for b in batches.values()])
    texts = torch.cat([b[1] for b in batches.values()])
    phases.mark("data")
    img, txt, scale = r.training.forward(images, texts)
    phases.mark("forward")
    from cliperase.engine.methods import build_features

    rows = {name: len(b[0]) for name, b in batches.items()}
    teacher = {name: r._teacher_rows(name, images, texts, rows) for name in r.method.teacher_streams}
    f = build_features(rows, img, txt, tokens=texts, teacher=teacher, logit_scale=r.frozen_scale,
                       teacher_logit_scale=r.frozen_scale, step=step, state=r.ctx.state,
                       mask_captions=r.cfg.mask_duplicate_captions)
    losses = r.method.objective(f)
    phases.mark("loss")
    r.stepper.backward(losses["loss"])
    phases.mark("backward")
    r.stepper.step()
    r.losses.add(losses)
    r.losses.next_step()
    phases.mark("optimizer")


def _timed(fn: Callable[[], None]):
    """(wall s, process CPU s) of `fn()`. CPU time is what a shared machine's load does not
    inflate (time-sharing); with one torch thread no OpenMP spin-wait is in it either."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _profile(fn: Callable[[], None], rows: int = 15) -> List[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:rows]]


def run(model_name: str, pairs: int, reps: int, warmup: int, phase_reps: int, root: Path) -> dict:
    from open_clip.loss import ClipLoss

    from cliperase.engine import UnlearnConfig
    from cliperase.engine.recipe import UnlearnRecipe

    if pairs < 2 or pairs % 2:
        raise SystemExit(f"--pairs: expected an even number >= 2 (half forget, half retain), got {pairs}")
    t0 = time.perf_counter()
    data = _data(root, n_train=max(96, 16 * pairs))
    ckpt = root / "init.pt"
    _checkpoint(model_name, ckpt)
    per_stream = pairs // 2
    total_steps = 2 * (warmup + reps + phase_reps + 1) + 4
    cfg = UnlearnConfig(model=model_name, pretrained=str(ckpt), forget_data=str(data / "forget"),
                        retain_data=str(data / "retain"), eval_data=str(data / "eval"), forget_classes=("circle",),
                        method="cliperase", teacher="cache", steps=total_steps, batch_size=per_stream, lr=1e-6,
                        log_every=10 ** 6, save_every=0, eval_batch_size=8, device="cpu",
                        output_dir=str(root / "run"), overwrite=True, resampled=True, data_workers=0)
    recipe = UnlearnRecipe(cfg, progress=False)
    recipe.setup()
    setup_s = time.perf_counter() - t0
    model = recipe.student
    optimizer = recipe.stepper.optimizer
    loss_fn = ClipLoss()
    # The plain step's own batches from the same loader: other seeds, same decode path.
    streams = [iter(recipe._batches(name, hook=True)) for name in ("forget", "retain")]
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for g in optimizer.param_groups for p in g["params"])

    step = [0]

    def plain():
        plain_step(model, loss_fn, optimizer, streams)

    def unlearn():
        cliperase_step(recipe, step[0])
        step[0] += 1

    for _ in range(warmup):
        plain()
        unlearn()
    times = {"plain": [], "cliperase": []}
    cpu = {"plain": [], "cliperase": []}
    load_before = os.getloadavg()
    for i in range(reps):
        order = (("plain", plain), ("cliperase", unlearn))
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            wall, cpu_s = _timed(fn)
            times[name].append(wall)
            cpu[name].append(cpu_s)
    load_after = os.getloadavg()

    phases = {"plain": [], "cliperase": []}
    for _ in range(phase_reps):
        p = Phases()
        plain_step(model, loss_fn, optimizer, streams, p)
        phases["plain"].append(p.t)
        p = Phases()
        cliperase_step(recipe, step[0], p)
        step[0] += 1
        phases["cliperase"].append(p.t)
    profiles = {"plain": _profile(plain), "cliperase": _profile(unlearn)}

    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    paired = [c / p for p, c in zip(times["plain"], times["cliperase"])]
    paired_cpu = [c / p for p, c in zip(cpu["plain"], cpu["cliperase"])]
    phase_median = {k: {ph: statistics.median(r[ph] for r in rows) for ph in rows[0]} for k, rows in phases.items()}
    return {
        "model": model_name, "params": params, "trained_params": trained, "image_size": 224, "precision": "fp32",
        "pairs_per_step": pairs, "cliperase_pairs": f"{per_stream} forget + {per_stream} retain",
        "plain_pairs": f"{pairs} (the same {per_stream} + {per_stream} batches' shape, one ClipLoss over all)",
        "reps": reps, "warmup_steps_each": warmup, "order": "ABBA (plain, cliperase, cliperase, plain, ...)",
        "torch_threads": torch.get_num_threads(),
        "cpu_step_s": cpu, "median_cpu_step_s": med_cpu, "cpu_ratio_of_medians": med_cpu["cliperase"] / med_cpu["plain"],
        "cpu_paired_ratio_median": statistics.median(paired_cpu),
        "cpu_paired_ratio_range": [min(paired_cpu), max(paired_cpu)],
        "step_s": times, "median_step_s": med, "ratio_of_medians": med["cliperase"] / med["plain"],
        "paired_ratio_median": statistics.median(paired), "paired_ratio_range": [min(paired), max(paired)], "phase_median_cpu_s": phase_median, "phase_reps": phase_reps,
        "profile_top_ops": profiles, "loadavg_before": load_before, "loadavg_after": load_after,
        "setup_s": setup_s, "teacher_cache_s": recipe.cache_s, "peak_rss_bytes": _status_bytes("VmHWM"),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pairs", type=int, default=8, help="image-text pairs per step (half forget, half retain)")
    ap.add_argument("--reps", type=int, default=12, help="timed steps of each")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--phase-reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON; an existing one gains/replaces this model")
    ap.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the generated data goes")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="step-ratio-", dir=args.tmp) as tmp:
        result = run(args.model, args.pairs, args.reps, args.warmup, args.phase_reps, Path(tmp))
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    result["environment"] = {**environment(), "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                             "nice": os.nice(0), "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    print(json.dumps({k: result[k] for k in ("model", "median_cpu_step_s", "cpu_ratio_of_medians", "median_step_s",
                                              "ratio_of_medians", "paired_ratio_median",
                                              "phase_median_cpu_s", "peak_rss_bytes")}, indent=1))
    if args.out:
        existing = json.loads(args.out.read_text()) if args.out.is_file() else {}
        existing[f"{args.model}-pairs{args.pairs}"] = result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(existing, indent=1) + "\n")


if __name__ == "__main__":
    main()
