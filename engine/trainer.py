"""The one training loop: every method and pretraining step through it.

A step function returns named losses (with "loss" the one to minimise); the loop owns
progress, logging and the finiteness check, and hands backward and the optimizer step to a
Stepper: `TorchStepper` (AdamW + the lr schedule on plain parameters) or `DeepSpeedStepper`
(`engine.backward(loss); engine.step()`). Host syncs happen only on log steps.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["NonFiniteLoss", "make_optimizer", "lr_factor", "TorchStepper", "DeepSpeedStepper", "train_loop",
           "resolve_device"]


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or Inf; the message names the step and the term."""


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
        """Collective. DeepSpeed restores the module, optimizer, lr scheduler and its step counters."""
        path, _ = self.engine.load_checkpoint(str(Path(directory).parent), tag=Path(directory).name)
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


def train_loop(
    params: Optional[Iterable[nn.Parameter]],
    step_fn: Callable[[], Dict[str, Tensor]],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    schedule: str = "constant",
    log_every: int = 10,
    log_path: Optional[Path] = None,
    desc: str = "train",
    progress: bool = True,
    stepper=None,
    accum_steps: int = 1,
    timer=None,
    on_step: Optional[Callable[[int, Optional[dict]], None]] = None,
    start_step: int = 0,
) -> List[dict]:
    """Run `steps` optimizer steps of `accum_steps` micro-batches each; returns the logged rows
    (step, lr, each named loss averaged over the step's micro-batches, rate).

    `on_step(step, row)`: called after every optimizer step (1-based) with the logged row on log
    steps, else None: periodic evaluation and TensorBoard hang here, not in the loop.
    `timer`: a telemetry.DataWaitTimer whose `step()` times each optimizer step (for the share
    of step time spent waiting for data), or None.
    `stepper`: a TorchStepper or DeepSpeedStepper; None builds a TorchStepper over `params`
    with `lr`, `weight_decay` and the schedule. `start_step`: optimizer steps already done (a
    resumed run; the stepper's state restored), the loop runs the rest. Raises NonFiniteLoss at the first log step whose
    losses are not all finite.
    """
    if stepper is None:
        schedule_fn = lambda s: lr_factor(s, steps=steps, warmup_steps=warmup_steps, schedule=schedule)  # noqa: E731
        stepper = TorchStepper(params, lr=lr, weight_decay=weight_decay, lr_fn=schedule_fn, accum_steps=accum_steps)
    history: List[dict] = []
    log = open(log_path, "a") if log_path else None
    t0 = last_t = time.perf_counter()
    last_step = start_step
    try:
        bar = tqdm(range(start_step, steps), desc=desc, disable=not progress, dynamic_ncols=True, initial=start_step,
                   total=steps)
        for step in bar:
            with timer.step() if timer is not None else contextlib.nullcontext():
                log_step = (step + 1) % log_every == 0 or step + 1 == steps
                for micro in range(accum_steps):
                    micro_losses = step_fn()
                    stepper.backward(micro_losses["loss"])
                    if log_step and micro == accum_steps - 1:
                        # Before the update: a NaN/Inf gradient must not reach the weights.
                        bad = stepper.nonfinite_grads()
                        if bad:
                            values = {k: v.item() for k, v in micro_losses.items()}
                            terms = [k for k, v in values.items() if not math.isfinite(v)]
                            raise NonFiniteLoss(f"step {step + 1}: non-finite loss term(s) {terms}: {values}" if terms
                                                else f"step {step + 1}: non-finite gradient in {len(bad)} parameter(s), "
                                                f"e.g. {bad[:3]}; the losses were finite")
                    stepper.step()
                    detached = {k: v.detach() for k, v in micro_losses.items()}
                    losses = detached if micro == 0 else {k: losses[k] + v for k, v in detached.items()}
            if accum_steps > 1:
                losses = {k: v / accum_steps for k, v in losses.items()}
            if log_step:
                values = {k: v.item() for k, v in stepper.for_log(losses).items()}  # the loop's only host sync
                bad = [k for k, v in values.items() if not math.isfinite(v)]
                if bad:
                    raise NonFiniteLoss(f"step {step + 1}: non-finite loss term(s) {bad}: {values}")
                now = time.perf_counter()
                row = {"step": step + 1, "lr": stepper.lr, **values,
                       "steps_per_s": (step + 1 - last_step) / max(now - last_t, 1e-9), "elapsed_s": now - t0}
                last_t, last_step = now, step + 1
                history.append(row)
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                if log:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
            if on_step is not None:
                on_step(step + 1, history[-1] if history and history[-1]["step"] == step + 1 else None)
    finally:
        if log:
            log.close()
    return history
