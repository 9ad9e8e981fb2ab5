"""What a training loop hands the update to, and what it checks.

A Stepper does backward and the optimizer step, once per micro-batch as DeepSpeed does:
`TorchStepper` (AdamW + the lr schedule on plain parameters) or `DeepSpeedStepper`
(`engine.backward(loss); engine.step()`). `LossLog` averages a step's micro-batch losses, brings
them to the host on log steps only (the loop's one routine sync) and writes log.jsonl;
`NonFiniteLoss` is what it raises for a NaN/Inf. The loops themselves are the recipe's `train`
(engine/recipe.py) and pretraining's (engine/tools/pretrain.py).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn

from .errors import NonFiniteLoss

__all__ = ["NonFiniteLoss", "make_optimizer", "lr_factor", "TorchStepper", "DeepSpeedStepper", "LossLog",
           "check_gradients", "resolve_device"]


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def make_optimizer(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    try:
        # The fused kernel is several times faster on CPU and GPU alike (torch >= 2.4).
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_factor(step: int, *, steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then constant or cosine."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))
    return 1.0


class TorchStepper:
    """Plain torch: AdamW and a LambdaLR of `lr_fn` (multiplier of `lr` per optimizer step).

    `backward` and `step` are called once per micro-batch, as DeepSpeed's are: gradients of
    `accum_steps` micro-batches are averaged, then (at the boundary) clipped to `grad_clip`
    (0 = off), applied, zeroed, and the schedule advances.
    """

    def __init__(self, params: Iterable[nn.Parameter], *, lr: float, weight_decay: float,
                 lr_fn: Callable[[int], float], accum_steps: int = 1, grad_clip: float = 0.0,
                 module: Optional[nn.Module] = None):
        self.optimizer = make_optimizer(params, lr, weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_fn)
        self.accum_steps, self.grad_clip, self.micro = accum_steps, grad_clip, 0
        self.module = module  # whose state_dict checkpoints hold (save/load)

    def save(self, directory: Path) -> None:
        """Model, optimizer and schedule state into `directory` (one process: the only writer)."""
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "micro": self.micro}
        torch.save(state, Path(directory) / "model_optim.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(Path(directory) / "model_optim.pt", map_location="cpu", weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = state["micro"]

    def backward(self, loss: Tensor) -> None:
        (loss if self.accum_steps == 1 else loss / self.accum_steps).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum_steps:
            return
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def nonfinite_grads(self) -> list:
        """Names (or indices) of parameters whose gradient holds a NaN/Inf. One host sync: the
        loop asks on log steps only."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return []
        finite = torch.stack([torch.isfinite(p.grad).all() for p in params]).cpu()
        names = {id(p): n for n, p in self.module.named_parameters()} if self.module is not None else {}
        return [names.get(id(p), i) for i, (p, ok) in enumerate(zip(params, finite)) if not ok]

    def for_log(self, losses: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return losses


class DeepSpeedStepper:
    """A DeepSpeed engine: it scales for accumulation, reduces gradients across ranks, clips,
    steps its optimizer and lr scheduler at accumulation boundaries."""

    def __init__(self, engine):
        self.engine = engine

    def save(self, directory: Path) -> None:
        """Collective: every rank writes its shard of the module and optimizer states (ZeRO)."""
        self.engine.save_checkpoint(str(Path(directory).parent), tag=Path(directory).name, save_latest=False)

    def load(self, directory: Path) -> None:
        """Collective. DeepSpeed restores the module, optimizer, lr scheduler and its step counters.
        Its files are memory-mapped (torch.load's mmap default, for this call only): the optimizer
        states it loads replace the ones the engine made at start-up instead of coexisting with
        them in anonymous memory, so a rank's peak while resuming is its training state, not twice it."""
        from torch.utils.serialization import config

        mmap, config.load.mmap = config.load.mmap, True
        try:
            path, _ = self.engine.load_checkpoint(str(Path(directory).parent), tag=Path(directory).name)
        finally:
            config.load.mmap = mmap
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint to load in {directory}")

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def nonfinite_grads(self) -> list:
        """DeepSpeed checks its own: fp16 runs skip a step whose gradients overflow (loss scaler);
        in bf16/fp32 a NaN gradient shows as a non-finite loss on a later log step."""
        return []

    def for_log(self, losses: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """The global batch's losses: each rank's are means over its equal share of rows, so their
        mean over ranks is the global mean. Collective: every rank calls it on log steps only."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return losses
        stacked = torch.stack([v.float() for v in losses.values()])
        dist.all_reduce(stacked)
        return dict(zip(losses, stacked / dist.get_world_size()))


def check_gradients(stepper, step: int, losses: Dict[str, Tensor]) -> None:
    """Raise NonFiniteLoss when a gradient holds a NaN/Inf, before the update applies it: naming
    the non-finite loss terms, else the parameters. A host sync: called on log steps only."""
    bad = stepper.nonfinite_grads()
    if not bad:
        return
    values = {k: v.item() for k, v in losses.items()}
    terms = [k for k, v in values.items() if not math.isfinite(v)]
    raise NonFiniteLoss(f"step {step}: non-finite loss term(s) {terms}: {values}" if terms
                        else f"step {step}: non-finite gradient in {len(bad)} parameter(s), "
                        f"e.g. {bad[:3]}; the losses were finite")


class LossLog:
    """A step's losses, averaged over its micro-batches on the device, and the logged rows.

    `add(losses)` per micro-batch (detached; no sync); `row(step, stepper)` on a log step brings
    the step's means to the host (through `stepper.for_log`, the global batch's under DeepSpeed),
    raises NonFiniteLoss for a NaN/Inf, and appends the row (step, lr, each loss, steps/s,
    elapsed s) to `rows` and to `path` (log.jsonl) when given.
    """

    def __init__(self, path: Optional[Path] = None, rows: Optional[List[dict]] = None, *, start_step: int = 0):
        self.path, self.rows = path, list(rows or [])
        self._sums: Dict[str, Tensor] = {}
        self._count = 0
        self._t0 = self._last_t = time.perf_counter()
        self._last_step = start_step

    def restart_clock(self) -> None:
        """Rates and elapsed times count from now (the loop's start), not from construction."""
        self._t0 = self._last_t = time.perf_counter()

    def add(self, losses: Dict[str, Tensor]) -> None:
        detached = {k: v.detach() for k, v in losses.items()}
        self._sums = detached if not self._count else {k: self._sums[k] + v for k, v in detached.items()}
        self._count += 1

    def row(self, step: int, stepper) -> dict:
        means = {k: v / self._count for k, v in self._sums.items()} if self._count > 1 else self._sums
        values = {k: v.item() for k, v in stepper.for_log(means).items()}  # the loop's only routine host sync
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteLoss(f"step {step}: non-finite loss term(s) {bad}: {values}")
        now = time.perf_counter()
        row = {"step": step, "lr": stepper.lr, **values,
               "steps_per_s": (step - self._last_step) / max(now - self._last_t, 1e-9), "elapsed_s": now - self._t0}
        self._last_t, self._last_step = now, step
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def next_step(self) -> None:
        """Forget the finished step's sums (call after each optimizer step)."""
        self._sums, self._count = {}, 0
