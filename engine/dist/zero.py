"""DeepSpeed plumbing: when a run goes through it, its process group, the ZeRO engine around the
student (and a sharded live teacher), and the consolidated state dict after training.

Everything here imports deepspeed lazily: a plain single-process run never pays its import.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Optional

import torch
from torch import Tensor, nn

from ..checkpoint import write_json
from ..errors import ConfigError
from ..models import Towers
from ..trainer import DeepSpeedStepper, TorchStepper, make_optimizer
from . import launched
from .ds_config import build_ds_config
from .partitioned import ShardedOriginal, gather_full_state, release_optimizer_state, sharded_engine

log = logging.getLogger("cliperase.dist")

if TYPE_CHECKING:
    from ..config import UnlearnConfig

__all__ = ["uses_deepspeed", "init_process_group", "Training", "build_training", "full_state_dict", "PRECISION_DTYPES"]

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def uses_deepspeed(cfg: "UnlearnConfig") -> bool:
    """Started by a launcher, or asking for ZeRO or mixed precision: the run goes through DeepSpeed."""
    return launched() or cfg.zero_stage > 0 or cfg.precision != "fp32"


def _check_precision_supported(precision: str) -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = {"fp32": True, "bf16": acc.is_bf16_supported(), "fp16": acc.is_fp16_supported()}[precision]
    if not supported:
        raise ConfigError([f"precision: {precision} is not supported by DeepSpeed's {acc.device_name()} accelerator "
                           "on this machine; use bf16 or fp32"])


def init_process_group(cfg: "UnlearnConfig", device: torch.device) -> torch.device:
    """One process group per process: the launcher's (env://), or a private 1-process one for
    DeepSpeed runs started without a launcher. Returns the rank's device (its own GPU when
    launched on CUDA). Raises ConfigError for a precision the accelerator lacks."""
    import deepspeed

    _check_precision_supported(cfg.precision)
    if launched() and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "gloo":
        _warn_of_a_stale_build_lock()
    if torch.distributed.is_initialized() or launched():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        if backend == "gloo":  # the segments are the CPU accelerator's; no barrier before a CUDA device is set
            _unlink_shm_allreduce_segments()
        return device
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    # DeepSpeed's engine insists on LOCAL_RANK (launchers set it). RANK and WORLD_SIZE stay
    # unset, so later runs in this process are not mistaken for launched ones.
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return device


def _warn_of_a_stale_build_lock(name: str = "deepspeed_shm_comm", older_than_s: float = 600) -> None:
    """On CPU, init_distributed JIT-builds DeepSpeed's shared-memory allreduce op (~3 min on 2
    cores) under torch's build lock. A run killed during that build leaves the lock behind, and
    every later run that needs a build (another torch, another deepspeed) then waits on it for
    ever, printing nothing (seen here). A lock older than any build names itself."""
    from torch.utils import cpp_extension

    try:
        lock = Path(cpp_extension._get_build_directory(name, False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (OSError, AttributeError):  # no lock (the usual case), or a torch without the helper
        return
    if age > older_than_s:
        log.warning("%s is %.0f minutes old: a run killed while building DeepSpeed's %s op left it, and "
                    "this run waits for it if it must build; delete it if nothing else is building", lock,
                    age / 60, name)


def _unlink_shm_allreduce_segments() -> None:
    """DeepSpeed's CPU shared-memory allreduce (its `deepspeed_shm_comm` op, used when every rank
    is on one machine) creates a 66 MB segment per rank in /dev/shm and never unlinks it, so each
    CPU launcher run left world_size x 66 MB of RAM behind until reboot (a day of test runs here:
    296 segments, 20 GB, then the OOM killer). init_distributed returns once this rank has mapped
    every peer's segment; after a barrier all ranks have, so the names can go: the mappings stay
    valid, and the memory is freed when the processes exit, killed ones included."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()
    # deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> in 0.19.8; the * also takes a name without the uid.
    for seg in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*{addr}_{port}_{torch.distributed.get_rank()}"):
        seg.unlink(missing_ok=True)


def _scalar_params_for_deepspeed(clip: nn.Module) -> Dict[str, torch.Size]:
    """DeepSpeed's start-up broadcast fails on 0-dim parameters (PITFALLS 1), and open_clip's
    logit_scale is one: a frozen 0-dim parameter becomes a buffer, a trained one a 1-element
    parameter (partitioned.assemble gives it back its shape on export). Returns {name: original
    shape} of the changed ones."""
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


@dataclass
class Training:
    """What the training loop drives: `forward(images, texts) -> (img, txt, scale)`, the stepper,
    the teacher's encoder for live-teacher runs, and (DeepSpeed) what consolidation needs."""

    forward: Callable
    stepper: object
    encode_teacher: Callable
    towers: Optional[Towers] = None  # DeepSpeed: the wrapped student
    buffers: Dict[str, Tensor] = field(default_factory=dict)  # DeepSpeed: state-dict entries never trained


def build_training(cfg: "UnlearnConfig", student: nn.Module, teacher: Optional[nn.Module], *, live_teacher: bool,
                   use_ds: bool, world: int, ds_config_path: Optional[Path], lr_fn: Callable[[int], float]) -> Training:
    """Plain torch (TorchStepper) or a DeepSpeed engine around the student; under ZeRO-3 a live
    teacher becomes a sharded inference engine too. `ds_config_path`: where to write the
    DeepSpeed config (rank 0), or None."""
    encode_teacher = lambda x, t: (teacher.encode_image(x), teacher.encode_text(t))  # noqa: E731
    if not use_ds:
        stepper = TorchStepper(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, lr_fn=lr_fn,
                               accum_steps=cfg.accum_steps, grad_clip=cfg.grad_clip, module=student)
        return Training(Towers(student), stepper, encode_teacher)
    import deepspeed

    ds_config = build_ds_config(cfg, world)
    if ds_config_path is not None:
        write_json(ds_config, ds_config_path)
    _scalar_params_for_deepspeed(student)
    # The state dict's buffers (BN statistics, a frozen logit_scale) are never trained: kept as loaded.
    params = {k for k, _ in student.named_parameters()}
    buffers = {k: v.detach().cpu().clone() for k, v in student.state_dict().items() if k not in params}
    towers = Towers(student, zero3=cfg.zero_stage == 3, input_dtype=PRECISION_DTYPES.get(cfg.precision, torch.float32))
    # A client torch AdamW (no JIT-built DeepSpeed Adam) and the engine's own lr schedule.
    engine, *_ = deepspeed.initialize(model=towers, optimizer=make_optimizer(towers.parameters(), cfg.lr, cfg.weight_decay),
                                      config=ds_config,
                                      lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn))
    if isinstance(teacher, ShardedOriginal):  # built partitioned (dist.partitioned): already an engine
        encode_teacher = teacher.encode
    elif teacher is not None and live_teacher and cfg.zero_stage == 3:
        encode_teacher = _sharded_teacher(teacher, ds_config, towers.input_dtype)
    return Training(engine, DeepSpeedStepper(engine), encode_teacher, towers, buffers)


def _sharded_teacher(teacher: nn.Module, ds_config: dict, dtype: torch.dtype) -> Callable:
    """A live teacher under ZeRO-3 inference: its parameters sharded across ranks like the
    student's and gathered layer by layer in its forward, in the run's precision; no optimizer.
    (The cache, the default, needs no teacher at all during training.)"""
    _scalar_params_for_deepspeed(teacher)
    engine = sharded_engine(teacher, ds_config, dtype)
    return lambda x, t: engine(x, t)[:2]


def full_state_dict(training: Training, *, keep: bool) -> Optional[Dict[str, Tensor]]:
    """The whole model's fp32 state dict, on the ranks with `keep` (None on the others). Collective
    under ZeRO: every rank calls it, each parameter is gathered in turn and dropped at once where
    not kept. Parameters come from the optimizer's fp32 master copy where DeepSpeed keeps one
    (ZeRO 1-3, bf16), else from the module; buffers (never trained) are the original model's.
    The Adam moments are released first: training is over, and the last checkpoint holds them."""
    release_optimizer_state(training.stepper.engine)
    params = gather_full_state(training.towers.clip, keep=keep)
    if not keep:
        return None
    return {**params, **training.buffers}  # a reshaped logit_scale goes back to 0-dim in partitioned.assemble
