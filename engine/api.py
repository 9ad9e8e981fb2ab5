"""`unlearn(UnlearnConfig(...))`: the surface the CLI and other frontends call."""
from __future__ import annotations

import copy
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as D
from .checkpoint import export_open_clip, write_json
from .config import UnlearnConfig
from .errors import ConfigError
from .data import PairStream, load_eval_set, loader, resolve_shards
from .evaluate import evaluate
from .methods import Features, get_method
from .models import load_model
from .telemetry import DataWaitTimer, GpuSampler
from .trainer import DeepSpeedStepper, TorchStepper, lr_factor, make_optimizer, resolve_device, train_loop

__all__ = ["unlearn"]

log = logging.getLogger("cliperase")


def _versions() -> dict:
    import open_clip

    return {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__}


class Towers(nn.Module):
    """The module DeepSpeed wraps: `forward(images, texts)` returns the CLIP's raw (unnormalised)
    image and text features, fp32, and its exponentiated temperature (None when frozen).

    Being the top-level module matters under ZeRO-3, which gathers a module's parameters when its
    forward runs: the CLIP's own top-level parameters (text_projection, positional_embedding...)
    are used by encode_text outside any submodule's forward, so they are registered as external
    parameters of this module. `input_dtype` is the dtype the towers compute in (bf16/fp16 runs).
    """

    def __init__(self, clip: nn.Module, *, zero3: bool = False):
        super().__init__()
        self.clip = clip
        self.input_dtype = torch.float32
        if zero3:
            import deepspeed

            for param in clip.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(self, param)

    def forward(self, images: Tensor, texts: Tensor):
        img = self.clip.encode_image(images.to(self.input_dtype))
        txt = self.clip.encode_text(texts)
        scale = self.clip.logit_scale
        scale = scale.exp().reshape(()) if scale.requires_grad else None
        return img.float(), txt.float(), scale


def _use_deepspeed(cfg: UnlearnConfig) -> bool:
    return D.launched() or cfg.zero_stage > 0 or cfg.precision != "fp32"


def _check_precision_supported(precision: str) -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = {"fp32": True, "bf16": acc.is_bf16_supported(), "fp16": acc.is_fp16_supported()}[precision]
    if not supported:
        raise ConfigError([f"precision: {precision} is not supported by DeepSpeed's {acc.device_name()} accelerator "
                           "on this machine; use bf16 or fp32"])


def _init_distributed(device: torch.device) -> None:
    """One process group per process: the launcher's (env://), or a private 1-process one for
    DeepSpeed runs started without a launcher."""
    import deepspeed

    backend = "nccl" if device.type == "cuda" else "gloo"
    if torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    elif D.launched():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    else:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        # DeepSpeed's engine insists on LOCAL_RANK (launchers set it). RANK and WORLD_SIZE stay
        # unset, so later runs in this process are not mistaken for launched ones.
        os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(dist_backend=backend, verbose=False)


def _scalar_params_for_deepspeed(clip: nn.Module) -> Dict[str, torch.Size]:
    """DeepSpeed's start-up broadcast fails on 0-dim parameters (PITFALLS 1), and open_clip's
    logit_scale is one: a frozen 0-dim parameter becomes a buffer, a trained one a 1-element
    parameter. Returns {name: original shape} of the changed ones, to restore on export."""
    changed = {}
    for name, param in list(clip.named_parameters(recurse=False)):
        if param.dim() != 0:
            continue
        changed[name] = param.shape
        del clip._parameters[name]
        if param.requires_grad:
            clip.register_parameter(name, nn.Parameter(param.detach().reshape(1).clone()))
        else:
            clip.register_buffer(name, param.detach().clone())
    return changed


def _full_state_dict(towers: Towers, buffers: Dict[str, Tensor], shapes: Dict[str, torch.Size]) -> Dict[str, Tensor]:
    """The whole model's fp32 state dict, on every rank (collective under ZeRO: every rank calls
    it). Parameters come from the optimizer's fp32 master copy where DeepSpeed keeps one (ZeRO
    1-3, bf16), else from the module; buffers (never trained) are the original model's."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in towers.clip.named_parameters():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                full = param.detach().clone()
        state[name] = full.detach().float().cpu().reshape(shapes.get(name, full.shape))
    for name, value in buffers.items():
        state[name] = value.reshape(shapes.get(name, value.shape))
    return state


def _train_mode(model: torch.nn.Module) -> None:
    """Train mode, but BatchNorm (ResNet towers) stays in eval mode: its running statistics are
    the original model's, small forget/retain batches would corrupt them, and the consistency
    term compares against a teacher that normalises with those same statistics."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def _tensorboard(log_dir: Path):
    """A SummaryWriter, or None (said once) when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard curves (log.jsonl and eval.jsonl have them)")
        return None
    return SummaryWriter(str(log_dir))


def unlearn(cfg: UnlearnConfig, *, progress: bool = True, data_workers: int = 1) -> Optional[dict]:
    """Unlearn `cfg.forget_data` from `cfg.model` and report before/after metrics.

    Validates the whole config first (ConfigError lists every problem, before any model is
    built), evaluates the original model, runs `cfg.steps` steps of `cfg.method`, evaluates
    again with the same code, and writes to `cfg.output_dir`:
      - `report.json`: {"method", "model", "config", "steps", "wall_s", "before", "after", ...}
      - `model.pt` (+ `model.pt.json`): the unlearned weights as an open_clip state dict,
      - `run.json` (config, versions, status) and `log.jsonl` (losses every `log_every` steps),
      - `ds_config.json`: the DeepSpeed config, on runs through DeepSpeed.
    The input checkpoint is only read. Returns the report (on rank 0; other ranks return None).

    Runs through DeepSpeed when started by a launcher (`deepspeed launch/unlearn.py ...`: every
    rank runs this function) or when `zero_stage > 0` / `precision != "fp32"`; otherwise plain
    torch on one process. Distributed, the global batch is `batch_size * world` pairs of each
    stream: every rank reads the same seeded stream in batches of `batch_size * world` and keeps
    rows `rank * batch_size .. (rank + 1) * batch_size` (the rows a 1-process run with
    `batch_size * world` sees, in the same order); losses take local rows against the gathered
    global batch, and only rank 0 evaluates and writes files.
    """
    cfg.validate()
    t_start = time.perf_counter()
    use_ds = _use_deepspeed(cfg)
    device = resolve_device(cfg.device)
    if use_ds:
        _check_precision_supported(cfg.precision)
        if D.launched() and device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        _init_distributed(device)
    rank, world, main = D.rank(), D.world_size(), D.is_main()
    out = Path(cfg.output_dir)
    run_info = {"status": "running", "config": cfg.to_dict(), "versions": _versions(), "world_size": world}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "log.jsonl").unlink(missing_ok=True)
        write_json(run_info, out / "run.json")

    torch.manual_seed(cfg.seed)
    method = get_method(cfg.method)
    loaded = load_model(cfg.model, cfg.pretrained, device=device)
    student = loaded.model
    ev = load_eval_set(cfg.eval_data, loaded.preprocess) if main else None
    before = evaluate(student, loaded.tokenizer, ev, cfg.forget_classes) if main else None

    # s is the original model's temperature, frozen unless asked otherwise (METHOD.md).
    student.logit_scale.requires_grad_(cfg.train_logit_scale)
    frozen_scale = student.logit_scale.detach().exp().clone()
    teacher = copy.deepcopy(student).requires_grad_(False).eval() if method.uses_teacher else None
    _train_mode(student)
    if cfg.grad_checkpointing:
        student.set_grad_checkpointing(True)
    lr_fn = lambda s: lr_factor(s, steps=cfg.steps, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule)  # noqa: E731

    if use_ds:
        import deepspeed

        from .ds_config import build_ds_config

        ds_config = build_ds_config(cfg, world)
        if main:
            write_json(ds_config, out / "ds_config.json")
        shapes = _scalar_params_for_deepspeed(student)
        # The state dict's buffers (BN statistics, a frozen logit_scale) are never trained: kept as loaded.
        params = {k for k, _ in student.named_parameters()}
        buffers = {k: v.detach().cpu().clone() for k, v in student.state_dict().items() if k not in params}
        towers = Towers(student, zero3=cfg.zero_stage == 3)
        towers.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
        # A client torch AdamW (no JIT-built DeepSpeed Adam) and the engine's own lr schedule.
        engine, *_ = deepspeed.initialize(model=towers, optimizer=make_optimizer(towers.parameters(), cfg.lr, cfg.weight_decay),
                                          config=ds_config,
                                          lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn))
        forward, stepper = engine, DeepSpeedStepper(engine)
    else:
        forward = towers = Towers(student)
        stepper = TorchStepper(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, lr_fn=lr_fn,
                               accum_steps=cfg.accum_steps, grad_clip=cfg.grad_clip)

    data_wait = DataWaitTimer()

    def stream(spec: str, what: str, offset: int):
        shards = resolve_shards(spec, what)
        batches = loader(PairStream(shards, loaded.preprocess, loaded.tokenizer, cfg.batch_size * world,
                                    seed=cfg.seed + offset, what=what), data_workers)
        if world > 1:
            rows = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)  # this rank's part of the global batch
            batches = ((images[rows], texts[rows]) for images, texts in batches)
        return data_wait.wrap(batches)

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
        img, txt, scale = forward(images, texts)
        feats = Features(logit_scale=scale if cfg.train_logit_scale else frozen_scale,
                         teacher_logit_scale=frozen_scale)
        start = 0
        for name, (b_images, b_texts) in parts:
            n = len(b_images)
            for kind, x in (("img", img), ("txt", txt)):
                local, global_, feats.row_offset = D.gather_rows(x[start : start + n])
                setattr(feats, f"{name}_{kind}", local)
                setattr(feats, f"{name}_{kind}_all", global_)
            if teacher is not None and (name == "retain" or method.teacher_on_forget):
                prefix = "teacher" if name == "retain" else "teacher_forget"
                with torch.no_grad():
                    setattr(feats, f"{prefix}_img", F.normalize(teacher.encode_image(images[start : start + n]), dim=-1))
                    setattr(feats, f"{prefix}_txt", F.normalize(teacher.encode_text(texts[start : start + n]), dim=-1))
                if name == "retain":
                    feats.teacher_img_all = D.gather_rows(feats.teacher_img)[1]
                    feats.teacher_txt_all = D.gather_rows(feats.teacher_txt)[1]
            start += n
        return method.objective(feats, cfg)

    # Curves: losses on log steps and zero-shot accuracy every eval_every steps, to TensorBoard
    # (runs/<dir>/tensorboard) and, for plots without TensorBoard, eval.jsonl.
    writer = _tensorboard(out / "tensorboard") if main else None
    eval_rows = []

    def record_eval(step_no: int, zeroshot: dict) -> None:
        eval_rows.append({"step": step_no, **zeroshot})
        if writer is not None:
            for k, v in zeroshot.items():
                writer.add_scalar(f"eval/{k}", v, step_no)

    def on_step(step_no: int, row: Optional[dict]) -> None:
        if writer is not None and row is not None:
            for k, v in row.items():
                if k != "step":
                    writer.add_scalar(f"train/{k}", v, step_no)
        if main and cfg.eval_every and step_no % cfg.eval_every == 0 and step_no < cfg.steps:
            record_eval(step_no, evaluate(student, loaded.tokenizer, ev, cfg.forget_classes)["zeroshot"])
            _train_mode(student)  # evaluate() restores plain train mode, BatchNorm included

    if main and "zeroshot" in before:
        record_eval(0, before["zeroshot"])
    t_train = time.perf_counter()
    gpu = GpuSampler(interval_s=2.0).start()  # says once and carries on when there is no GPU or NVML
    try:
        history = train_loop(
            None, step, steps=cfg.steps, lr=cfg.lr, log_every=cfg.log_every, log_path=out / "log.jsonl" if main else None,
            desc=f"unlearn[{cfg.method}]", progress=progress and main, stepper=stepper, accum_steps=cfg.accum_steps,
            timer=data_wait, on_step=on_step,
        )
    finally:
        gpu_summary = gpu.stop()
    train_s = time.perf_counter() - t_train
    if use_ds:
        state = _full_state_dict(towers, buffers, shapes)  # every rank takes part
        if not main:
            D.barrier()
            return None
        student = load_model(cfg.model, None, device=device).model
        student.load_state_dict(state)
    student.eval()
    after = evaluate(student, loaded.tokenizer, ev, cfg.forget_classes)
    export_open_clip(student, out / "model.pt", meta={"model": cfg.model, "method": cfg.method, "steps": cfg.steps,
                                                       "source": cfg.pretrained, "world_size": world})
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
        # GPU utilisation, memory, power, clocks (NVML) and the share of step time spent waiting
        # for data, both measured during training.
        "telemetry": {"gpu": gpu_summary, "data": data_wait.summary()},
    }
    if "zeroshot" in after:
        record_eval(cfg.steps, after["zeroshot"])
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    if writer is not None:
        writer.close()
    write_json(report, out / "report.json")
    write_json({**run_info, "status": "finished"}, out / "run.json")
    if use_ds:
        D.barrier()
    return report
