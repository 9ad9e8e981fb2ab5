"""Train a small CLIP from scratch on image-caption shards (the embedded default's teacher, or
any img2dataset-style data) and save an open_clip-loadable checkpoint."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import torch

from cliperase.kernels import clip_infonce

from ..checkpoint import export_open_clip
from ..data import PairStream, loader, resolve_shards, shard_problems
from ..errors import ConfigError
from ..models import check_model_spec, load_model
from ..progress import progress_bar
from ..trainer import LossLog, TorchStepper, check_gradients, lr_factor, resolve_device

__all__ = ["PretrainConfig", "pretrain"]


@dataclass(frozen=True)
class PretrainConfig:
    model: str = "tiny-clip"  # open_clip architecture name, built with random weights
    train_data: Optional[str] = None  # image-caption shards (dir, brace pattern, file; '::' joins)
    steps: int = 500  # optimizer steps
    batch_size: int = 128  # pairs per step
    lr: float = 3e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.1
    warmup_steps: int = 50  # linear warmup, then cosine decay to 0
    seed: int = 0
    output: str = "pretrained.pt"  # checkpoint path; a JSON sidecar beside it records the run
    log_every: int = 50
    device: str = "auto"

    def problems(self) -> List[str]:
        p = check_model_spec(self.model, None) + shard_problems(self.train_data, "train_data")
        for name in ("steps", "batch_size", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                p.append(f"{name}: expected a positive integer, got {v!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            p.append(f"lr: expected a positive number, got {self.lr!r}")
        if Path(self.output).is_dir():
            p.append(f"output: {self.output!r} is a directory; expected a checkpoint file path")
        return p


def pretrain(cfg: PretrainConfig, *, progress: bool = True, data_workers: int = 1) -> Path:
    """Train with the symmetric CLIP loss and a learned temperature; returns the checkpoint path."""
    problems = cfg.problems()
    if problems:
        raise ConfigError(problems)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    loaded = load_model(cfg.model, None, device=device)
    model = loaded.model.train()
    batches = loader(PairStream(resolve_shards(cfg.train_data, "train_data"), loaded.preprocess, loaded.tokenizer,
                                cfg.batch_size, seed=cfg.seed, what="train_data"), data_workers)

    stepper = TorchStepper(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           lr_fn=lambda s: lr_factor(s, steps=cfg.steps, warmup_steps=cfg.warmup_steps, schedule="cosine"))
    losses = LossLog()
    t0 = time.perf_counter()
    for step in progress_bar(range(cfg.steps), desc=f"pretrain[{cfg.model}]", enabled=progress):
        images, texts = next(batches)
        zi, zt, scale = model(images.to(device), texts.to(device))
        step_losses = {"loss": clip_infonce(zi, zt, scale.clamp(max=100.0)), "logit_scale": scale.detach()}
        stepper.backward(step_losses["loss"])
        log_step = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        if log_step:
            check_gradients(stepper, step + 1, step_losses)  # before the update reaches the weights
        stepper.step()
        losses.add(step_losses)
        if log_step:
            losses.row(step + 1, stepper)
        losses.next_step()
    out = Path(cfg.output)
    export_open_clip(model, out, meta={"model": cfg.model, "pretrain": asdict(cfg), "wall_s": time.perf_counter() - t0,
                                       "final": losses.rows[-1]})
    return out
