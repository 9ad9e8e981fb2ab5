"""`unlearn(UnlearnConfig(...))`: the surface the CLI and other frontends call."""
from __future__ import annotations

import copy
import logging
import platform
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import export_open_clip, write_json
from .config import UnlearnConfig
from .data import PairStream, load_eval_set, loader, resolve_shards
from .evaluate import evaluate
from .methods import Features, get_method
from .models import load_model
from .trainer import resolve_device, train_loop

__all__ = ["unlearn"]

log = logging.getLogger("cliperase")


def _versions() -> dict:
    import open_clip

    return {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__}


def unlearn(cfg: UnlearnConfig, *, progress: bool = True, data_workers: int = 1) -> dict:
    """Unlearn `cfg.forget_data` from `cfg.model` and report before/after metrics.

    Validates the whole config first (ConfigError lists every problem, before any model is
    built), evaluates the original model, runs `cfg.steps` steps of `cfg.method`, evaluates
    again with the same code, and writes to `cfg.output_dir`:
      - `report.json`: {"method", "model", "config", "steps", "wall_s", "before", "after", ...}
      - `model.pt` (+ `model.pt.json`): the unlearned weights as an open_clip state dict,
      - `run.json` (config, versions, status) and `log.jsonl` (losses every `log_every` steps).
    The input checkpoint is only read. Returns the report.
    """
    cfg.validate()
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.jsonl").unlink(missing_ok=True)
    run_info = {"status": "running", "config": cfg.to_dict(), "versions": _versions()}
    write_json(run_info, out / "run.json")

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    method = get_method(cfg.method)
    loaded = load_model(cfg.model, cfg.pretrained, device=device)
    student = loaded.model
    ev = load_eval_set(cfg.eval_data, loaded.preprocess)
    before = evaluate(student, loaded.tokenizer, ev, cfg.forget_classes)

    # s is the original model's temperature, frozen unless asked otherwise (METHOD.md).
    student.logit_scale.requires_grad_(cfg.train_logit_scale)
    frozen_scale = student.logit_scale.detach().exp().clone()
    teacher = copy.deepcopy(student).requires_grad_(False).eval() if method.uses_teacher else None
    student.train()
    # BatchNorm (ResNet towers) stays in eval mode: its running statistics are the original
    # model's, small forget/retain batches would corrupt them, and the consistency term compares
    # against a teacher that normalises with those same statistics.
    for module in student.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()

    def stream(spec: str, what: str, offset: int):
        shards = resolve_shards(spec, what)
        return loader(PairStream(shards, loaded.preprocess, loaded.tokenizer, cfg.batch_size,
                                 seed=cfg.seed + offset, what=what), data_workers)

    forget_batches = stream(cfg.forget_data, "forget_data", 0) if method.uses_forget else None
    retain_batches = stream(cfg.retain_data, "retain_data", 1_000_003) if method.uses_retain else None

    def step() -> Dict[str, Tensor]:
        parts = []
        if forget_batches is not None:
            parts.append(("forget", next(forget_batches)))
        if retain_batches is not None:
            parts.append(("retain", next(retain_batches)))
        # One forward over forget + retain rows: the towers have no batch-coupled layers.
        images = torch.cat([b[0] for _, b in parts]).to(device, non_blocking=True)
        texts = torch.cat([b[1] for _, b in parts]).to(device, non_blocking=True)
        img, txt = student.encode_image(images), student.encode_text(texts)
        feats = Features(logit_scale=student.logit_scale.exp() if cfg.train_logit_scale else frozen_scale,
                         teacher_logit_scale=frozen_scale)
        start = 0
        for name, (b_images, b_texts) in parts:
            n = len(b_images)
            setattr(feats, f"{name}_img", img[start : start + n])
            setattr(feats, f"{name}_txt", txt[start : start + n])
            if teacher is not None and (name == "retain" or method.teacher_on_forget):
                prefix = "teacher" if name == "retain" else "teacher_forget"
                with torch.no_grad():
                    setattr(feats, f"{prefix}_img", F.normalize(teacher.encode_image(images[start : start + n]), dim=-1))
                    setattr(feats, f"{prefix}_txt", F.normalize(teacher.encode_text(texts[start : start + n]), dim=-1))
            start += n
        return method.objective(feats, cfg)

    t_train = time.perf_counter()
    history = train_loop(
        student.parameters(), step, steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, log_every=cfg.log_every,
        log_path=out / "log.jsonl", desc=f"unlearn[{cfg.method}]", progress=progress,
    )
    train_s = time.perf_counter() - t_train
    student.eval()
    after = evaluate(student, loaded.tokenizer, ev, cfg.forget_classes)
    export_open_clip(student, out / "model.pt", meta={"model": cfg.model, "method": cfg.method, "steps": cfg.steps,
                                                       "source": cfg.pretrained})
    report = {
        "method": cfg.method,
        "model": cfg.model,
        "config": cfg.to_dict(),
        "steps": cfg.steps,
        "wall_s": time.perf_counter() - t_start,
        "train_s": train_s,
        "before": before,
        "after": after,
        "final_losses": {k: v for k, v in history[-1].items() if k not in ("step", "lr", "steps_per_s", "elapsed_s")},
        "checkpoint": str(out / "model.pt"),
    }
    write_json(report, out / "report.json")
    write_json({**run_info, "status": "finished"}, out / "run.json")
    return report
