"""`unlearn(UnlearnConfig(...))`: the surface the CLI and other frontends call."""
from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as D
from .checkpoint import (CHECKPOINTS, atomic_write_bytes, begin_checkpoint, commit_checkpoint, export_open_clip,
                         find_checkpoint, read_manifest, write_errors, write_json)
from .config import UnlearnConfig, trajectory_fields
from .errors import ConfigError
from .data import SKIP_KINDS, PairStream, load_eval_set, loader, resolve_shards
from .evaluate import evaluate, load_attributes
from .methods import Features, RunContext, get_method
from .models import load_model
from .teacher_cache import TeacherCache
from .telemetry import DataWaitTimer, GpuSampler
from .trainer import (DeepSpeedStepper, NonFiniteLoss, TorchStepper, lr_factor, make_optimizer, resolve_device,
                      train_loop)

__all__ = ["unlearn", "Interrupted"]

log = logging.getLogger("cliperase")


def _versions() -> dict:
    import open_clip

    versions = {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__}
    try:  # metadata, not an import: importing deepspeed costs seconds on runs that do not use it
        versions["deepspeed"] = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        pass
    return versions


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT stopped the run after saving a checkpoint; `--resume` continues it."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in "
                         f"{checkpoint}; run again with --resume to continue")


class _StopSignals:
    """Turns the first SIGTERM / SIGINT into a request (`received`) that the loop answers by
    saving a checkpoint and stopping at the end of the step; a second one stops at once
    (KeyboardInterrupt). Handlers can only be installed from the main thread; elsewhere (a
    frontend's worker thread) signals keep their old behaviour."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("%s received: saving a checkpoint at the end of this step, then stopping "
                    "(send it again to stop at once)", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self, distributed: bool, device: torch.device) -> Optional[int]:
        """The signal received, agreed by all ranks (collective when `distributed`)."""
        if not distributed:
            return self.received
        flag = torch.tensor([self.received or 0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _input_fingerprint(path: Optional[str]) -> Optional[dict]:
    """Size and modification time of a local pretrained checkpoint: a resumed run checks that
    its original model is the same file (hashing a multi-GB file on every start would cost more)."""
    if path is None or not Path(path).is_file():
        return None
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _config_hash(cfg: UnlearnConfig) -> str:
    return hashlib.sha256(json.dumps(trajectory_fields(cfg), sort_keys=True).encode()).hexdigest()


def _resume_problems(cfg: UnlearnConfig, saved: dict, world: int) -> list:
    """Why a run saved as `saved` (run.json or a checkpoint manifest) cannot be continued by `cfg`."""
    problems = []
    old, new = saved.get("config", {}), trajectory_fields(cfg)
    for key in sorted(set(old) | set(new)):
        if key in new and old.get(key, new[key]) != new[key]:
            problems.append(f"{key}: the run being resumed has {old.get(key)!r}, now {new[key]!r} "
                            "(a resumed run must keep every setting that changes its result)")
    if saved.get("world_size", world) != world:
        problems.append(f"world size: the run being resumed ran on {saved['world_size']} ranks, now {world}")
    if saved.get("pretrained_file") and saved["pretrained_file"] != _input_fingerprint(cfg.pretrained):
        problems.append(f"pretrained: {cfg.pretrained} is not the file the run started from "
                        f"(size or modification time changed: {saved['pretrained_file']})")
    return problems


def _find_resume_point(cfg: UnlearnConfig, out: Path, world: int) -> Optional[Path]:
    """The checkpoint to continue from (None: start from step 0). Rank 0 decides; raises
    ConfigError when `cfg.resume` names an unusable checkpoint or the run differs from `cfg`."""
    if cfg.resume is None:
        return None
    path, passed_over = find_checkpoint(out, cfg.resume)
    for problem in passed_over:
        log.warning("resume: passing over a checkpoint: %s", problem)
    if path is None:
        if cfg.resume != "latest":
            raise ConfigError([f"resume: {p}" for p in passed_over])
        log.warning("resume: no complete checkpoint in %s; starting from step 0", out / CHECKPOINTS)
    saved = read_manifest(path) if path is not None else None
    if saved is None and (out / "run.json").is_file():
        saved = json.loads((out / "run.json").read_text())
    problems = _resume_problems(cfg, saved, world) if saved else []
    if problems:
        raise ConfigError(problems)
    return path


def _broadcast(obj, distributed: bool):
    """Rank 0's `obj` on every rank (an exception raised on rank 0 is re-raised everywhere)."""
    if not distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


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
    if torch.distributed.is_initialized() or D.launched():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        if backend == "gloo":  # the segments are the CPU accelerator's; no barrier before a CUDA device is set
            _unlink_shm_allreduce_segments()
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


@dataclass
class _Training:
    """What the training loop drives: `forward(images, texts) -> (img, txt, scale)`, the stepper,
    the teacher's encoder for live teacher runs, and (DeepSpeed) what consolidation needs."""

    forward: Callable
    stepper: object
    encode_teacher: Callable
    towers: Optional[Towers] = None  # DeepSpeed: the wrapped student
    buffers: Dict[str, Tensor] = field(default_factory=dict)  # DeepSpeed: state-dict entries never trained
    shapes: Dict[str, torch.Size] = field(default_factory=dict)  # DeepSpeed: 0-dim parameters reshaped for it


def _build_training(cfg: UnlearnConfig, student: nn.Module, teacher: Optional[nn.Module], *, live_teacher: bool,
                    use_ds: bool, world: int, ds_config_path: Optional[Path], lr_fn: Callable[[int], float]) -> _Training:
    """Plain torch (TorchStepper) or a DeepSpeed engine around the student; under ZeRO-3 a live
    teacher becomes a sharded inference engine too. `ds_config_path`: where to write the
    DeepSpeed config (rank 0), or None."""
    encode_teacher = lambda x, t: (teacher.encode_image(x), teacher.encode_text(t))  # noqa: E731
    if not use_ds:
        stepper = TorchStepper(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, lr_fn=lr_fn,
                               accum_steps=cfg.accum_steps, grad_clip=cfg.grad_clip, module=student)
        return _Training(Towers(student), stepper, encode_teacher)
    import deepspeed

    from .ds_config import build_ds_config

    ds_config = build_ds_config(cfg, world)
    if ds_config_path is not None:
        write_json(ds_config, ds_config_path)
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
    if teacher is not None and live_teacher and cfg.zero_stage == 3:
        # A live teacher under ZeRO-3 inference: its parameters sharded across ranks like the
        # student's and gathered layer by layer in its forward, in the run's precision; no
        # optimizer. (The cache, the default, needs no teacher at all during training.)
        _scalar_params_for_deepspeed(teacher)
        teacher_towers = Towers(teacher, zero3=True)
        teacher_towers.input_dtype = towers.input_dtype
        teacher_config = {k: v for k, v in ds_config.items() if k not in ("gradient_clipping", "zero_allow_untested_optimizer")}
        teacher_engine, *_ = deepspeed.initialize(model=teacher_towers, config=teacher_config)
        teacher_engine.eval()
        encode_teacher = lambda x, t: teacher_engine(x, t)[:2]  # noqa: E731
    return _Training(engine, DeepSpeedStepper(engine), encode_teacher, towers, buffers, shapes)


def _resume_point(cfg: UnlearnConfig, out: Path, world: int, rank: int, main: bool,
                  distributed: bool) -> Tuple[Optional[Path], dict, dict, int]:
    """Which checkpoint to continue from (rank 0 looks and verifies, every rank follows), and what
    it holds: (checkpoint or None, this rank's state, rank 0's run state, steps done)."""
    try:
        found = _find_resume_point(cfg, out, world) if main else None
        decision = str(found) if found else None
    except ConfigError as exc:
        decision = exc
    decision = _broadcast(decision, distributed)
    if isinstance(decision, ConfigError):
        raise decision
    if not decision:
        return None, {}, {}, 0
    path = Path(decision)
    rank_state = torch.load(path / f"rank_{rank}.pt", map_location="cpu", weights_only=False)
    run_state = torch.load(path / "run_state.pt", map_location="cpu", weights_only=False) if main else {}
    return path, rank_state, run_state, read_manifest(path)["step"]


class _Evaluator:
    """`evaluate()` on an eval set by root (default cfg.eval_data), each set and its attributes
    read once; the forget part narrowed to cfg.forget_attributes when given."""

    def __init__(self, cfg: UnlearnConfig, loaded):
        self.cfg, self.loaded = cfg, loaded
        self.sets: Dict[str, object] = {}
        self.attributes: Dict[str, list] = {}

    def __call__(self, model: nn.Module, root: Optional[str] = None) -> dict:
        root = root or self.cfg.eval_data
        if root not in self.sets:
            self.sets[root] = load_eval_set(root, self.loaded.preprocess)
        if self.cfg.forget_attributes and root not in self.attributes:
            self.attributes[root] = load_attributes(root)
        return evaluate(model, self.loaded.tokenizer, self.sets[root], self.cfg.forget_classes,
                        attributes=self.attributes.get(root), forget_where=self.cfg.forget_attributes or None)


def unlearn(cfg: UnlearnConfig, *, progress: bool = True, data_workers: int = 1) -> Optional[dict]:
    """Unlearn `cfg.forget_data` from `cfg.model` and report before/after metrics.

    Validates the whole config first (ConfigError lists every problem, before any model is
    built), evaluates the original model, runs `cfg.steps` steps of `cfg.method`, evaluates
    again with the same code, and writes to `cfg.output_dir`:
      - `report.json`: {"method", "model", "config", "steps", "wall_s", "before", "after", ...}
      - `model.pt` (+ `model.pt.json`): the unlearned weights as an open_clip state dict,
      - `run.json` (config, versions, status) and `log.jsonl` (losses every `log_every` steps),
      - `checkpoints/step_<N>/`: training checkpoints every `save_every` steps, at the end and
        on SIGTERM/SIGINT (which then raise Interrupted); `resume="latest"` continues from the
        newest one that verifies, on the same data order and lr schedule, and ends at the same
        weights as an uninterrupted run,
      - `ds_config.json`: the DeepSpeed config, on runs through DeepSpeed.
    The input checkpoint and shards are only read. Returns the report (on rank 0; other ranks
    return None).

    Runs through DeepSpeed when started by a launcher (`deepspeed launch/unlearn.py ...`: every
    rank runs this function) or when `zero_stage > 0` / `precision != "fp32"`; otherwise plain
    torch on one process. Distributed, the global batch is `batch_size * world` pairs of each
    stream, every rank decoding its own share (data.PairStream); losses take local rows against
    the gathered global batch, and only rank 0 evaluates and writes files.
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
    distributed = world > 1
    out = Path(cfg.output_dir)
    ckpt_root = out / CHECKPOINTS

    resume_from, rank_state, run_state, start_step = _resume_point(cfg, out, world, rank, main, distributed)
    decision = str(resume_from) if resume_from else None

    run_info = {"status": "running", "config": cfg.to_dict(), "versions": _versions(), "world_size": world,
                "pretrained_file": _input_fingerprint(cfg.pretrained), "resumed_from": decision}
    rows = list(run_state.get("history", []))  # logged rows, from step 1 (a resumed run's included)
    eval_rows = list(run_state.get("eval_rows", []))

    torch.manual_seed(cfg.seed)
    method = get_method(cfg.method)
    loaded = load_model(cfg.model, cfg.pretrained, device=device)
    student = loaded.model
    run_eval = _Evaluator(cfg, loaded)

    before = (run_state["before"] if resume_from else run_eval(student)) if main else None
    # Files appear only once the model and data have loaded: a refused input leaves no run behind.
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            # A fresh start (or --overwrite): another run's checkpoints and curves would be taken
            # for this one's. The teacher cache stays: it is keyed by what it was computed from.
            for stale in (ckpt_root, out / "tensorboard"):
                shutil.rmtree(stale, ignore_errors=True)
        # The log holds exactly the steps the weights have seen: rows past the checkpoint (work a
        # crash lost) go.
        atomic_write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode(), out / "log.jsonl")
        write_json(run_info, out / "run.json")

    # s is the original model's temperature, frozen unless asked otherwise (METHOD.md).
    student.logit_scale.requires_grad_(cfg.train_logit_scale)
    frozen_scale = student.logit_scale.detach().exp().clone()
    teacher = copy.deepcopy(student).requires_grad_(False).eval() if method.uses_teacher else None
    _train_mode(student)
    if cfg.grad_checkpointing:
        student.set_grad_checkpointing(True)
    lr_fn = lambda s: lr_factor(s, steps=cfg.steps, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule)  # noqa: E731

    def batches(spec: str, what: str, seed: int, start: Optional[dict] = None, workers: int = data_workers):
        stream = PairStream(resolve_shards(spec, what), loaded.preprocess, loaded.tokenizer, cfg.batch_size,
                            seed=seed, what=what, rank=rank, world=world, start=start, resampled=cfg.resampled,
                            split=cfg.data_split)
        return loader(stream, workers, pin_memory=device.type == "cuda", device=device)

    specs = {"forget": (cfg.forget_data, "forget_data", cfg.seed), "retain": (cfg.retain_data, "retain_data",
                                                                                cfg.seed + 1_000_003)}
    ctx = RunContext(cfg=cfg, student=student, teacher=teacher, tokenizer=loaded.tokenizer, device=device,
                     # Hooks read their own passes over the data (other seeds): the training
                     # streams' positions stay where checkpoints say.
                     batches=lambda which: batches(*specs[which][:2], specs[which][2] + 7_000_001, workers=0),
                     evaluate=run_eval if main else None, state=dict(rank_state.get("method_state", {})))
    if method.setup is not None:
        method.setup(ctx)  # may freeze parameters: before any optimizer exists

    # The teacher's embeddings of the training samples, once, instead of a second model forward
    # every step; afterwards the teacher leaves the accelerator (hooks may still read it, on the CPU).
    caches = {}
    t_cache = time.perf_counter()
    if teacher is not None and cfg.teacher == "cache":
        wanted = ["retain"] + (["forget"] if method.teacher_on_forget else [])
        for name in wanted:
            spec, what, _ = specs[name]
            caches[name] = TeacherCache.build_or_load(out / "teacher_cache", name, resolve_shards(spec, what), teacher,
                                                      loaded.preprocess, loaded.tokenizer, device=device,
                                                      batch_size=cfg.eval_batch_size, progress=progress)
        hooks = (method.setup, method.after_step, method.finish)
        teacher = ctx.teacher = teacher.to("cpu") if any(h is not None for h in hooks) else None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    cache_s = time.perf_counter() - t_cache

    train = _build_training(cfg, student, teacher, live_teacher=not caches, use_ds=use_ds, world=world,
                            ds_config_path=out / "ds_config.json" if main else None, lr_fn=lr_fn)
    forward, stepper, encode_teacher = train.forward, train.stepper, train.encode_teacher
    if resume_from:
        stepper.load(resume_from)
        _set_rng_state(rank_state["rng"])
        log.info("resumed from %s (step %d of %d)", resume_from, start_step, cfg.steps)

    data_wait = DataWaitTimer()
    saved_streams = rank_state.get("streams", {})
    streams = {name: batches(*specs[name], start=saved_streams.get(name))
               for name, used in (("forget", method.uses_forget), ("retain", method.uses_retain)) if used}
    timed = {name: data_wait.wrap(b) for name, b in streams.items()}
    done = [start_step]  # optimizer steps completed: the objective's Features.step

    def step() -> Dict[str, Tensor]:
        parts = [(name, next(timed[name])) for name in ("forget", "retain") if name in timed]
        # One forward over forget + retain rows: the towers have no batch-coupled layers.
        images = torch.cat([b[0] for _, b in parts]).to(device, non_blocking=True)
        texts = torch.cat([b[1] for _, b in parts]).to(device, non_blocking=True)
        img, txt, scale = forward(images, texts)
        feats = Features(logit_scale=scale if cfg.train_logit_scale else frozen_scale,
                         teacher_logit_scale=frozen_scale, step=done[0], method_state=ctx.state)
        start = 0
        for name, (b_images, b_texts) in parts:
            n = len(b_images)
            for kind, x in (("img", img), ("txt", txt)):
                local, global_, feats.row_offset = D.gather_rows(x[start : start + n])
                setattr(feats, f"{name}_{kind}", local)
                setattr(feats, f"{name}_{kind}_all", global_)
            if method.uses_teacher and (name == "retain" or method.teacher_on_forget):
                prefix = "teacher" if name == "retain" else "teacher_forget"
                if name in caches:
                    t_img, t_txt = caches[name].lookup(streams[name].last_ids)
                else:
                    with torch.no_grad():
                        t_img, t_txt = encode_teacher(images[start : start + n], texts[start : start + n])
                        t_img, t_txt = F.normalize(t_img.float(), dim=-1), F.normalize(t_txt.float(), dim=-1)
                setattr(feats, f"{prefix}_img", t_img)
                setattr(feats, f"{prefix}_txt", t_txt)
                if name == "retain":
                    feats.teacher_img_all = D.gather_rows(feats.teacher_img)[1]
                    feats.teacher_txt_all = D.gather_rows(feats.teacher_txt)[1]
            start += n
        return method.objective(feats, cfg)

    def save_checkpoint(step_no: int) -> Path:
        """Collective. Every rank writes its model/optimizer shard, stream positions and RNG;
        rank 0 the run's history; rank 0 seals it once all are written."""
        tmp = ckpt_root / f".step_{step_no:08d}.partial"
        if main:
            begin_checkpoint(ckpt_root, step_no)
        D.barrier()
        try:
            with write_errors(f"checkpoint step {step_no}", ckpt_root):
                stepper.save(tmp)
                torch.save({"streams": {k: b.state() for k, b in streams.items()}, "rng": _rng_state(),
                            "method_state": ctx.state}, tmp / f"rank_{rank}.pt")
                if main:
                    torch.save({"before": before, "history": rows, "eval_rows": eval_rows}, tmp / "run_state.pt")
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; complete checkpoints stay
            raise
        D.barrier()
        final = ckpt_root / f"step_{step_no:08d}"
        if main:
            final = commit_checkpoint(tmp, {"step": step_no, "steps": cfg.steps, "config_hash": _config_hash(cfg),
                                            "config": cfg.to_dict(), "world_size": world, "versions": _versions(),
                                            "pretrained_file": run_info["pretrained_file"],
                                            "data": {k: b.state() for k, b in streams.items()},
                                            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                      keep=cfg.keep_checkpoints)
        D.barrier()
        return final

    # Curves: losses on log steps and zero-shot accuracy every eval_every steps, to TensorBoard
    # (runs/<dir>/tensorboard) and, for plots without TensorBoard, eval.jsonl.
    writer = _tensorboard(out / "tensorboard") if main else None

    def record_eval(step_no: int, zeroshot: dict) -> None:
        eval_rows.append({"step": step_no, **zeroshot})
        if writer is not None:
            for k, v in zeroshot.items():
                writer.add_scalar(f"eval/{k}", v, step_no)

    signals = _StopSignals()

    def on_step(step_no: int, row: Optional[dict]) -> None:
        done[0] = step_no
        if row is not None:
            rows.append(row)
            if writer is not None:
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, step_no)
        if method.after_step is not None:
            method.after_step(ctx, step_no)
        if main and cfg.eval_every and step_no % cfg.eval_every == 0 and step_no < cfg.steps:
            record_eval(step_no, run_eval(student)["zeroshot"])
            _train_mode(student)  # evaluate() restores plain train mode, BatchNorm included
        saved = None
        if (cfg.save_every and step_no % cfg.save_every == 0) or step_no == cfg.steps:
            saved = save_checkpoint(step_no)
        # Ranks agree on stopping on log steps only (a collective); one process checks every step.
        if (not distributed or row is not None) and (signum := signals.agreed(distributed, device)):
            raise Interrupted(signum, step_no, saved or save_checkpoint(step_no))

    if main and "zeroshot" in before and not resume_from:
        record_eval(0, before["zeroshot"])
    t_train = time.perf_counter()
    gpu = GpuSampler(interval_s=2.0).start()  # says once and carries on when there is no GPU or NVML
    try:
        with signals:
            train_loop(
                None, step, steps=cfg.steps, lr=cfg.lr, log_every=cfg.log_every,
                log_path=out / "log.jsonl" if main else None, desc=f"unlearn[{cfg.method}]", progress=progress and main,
                stepper=stepper, accum_steps=cfg.accum_steps, timer=data_wait, on_step=on_step, start_step=start_step,
            )
    except (Interrupted, NonFiniteLoss, OSError, ConfigError) as exc:  # ConfigError: e.g. every shard vanished
        if main:
            last = find_checkpoint(out, "latest")[0]
            status = "interrupted" if isinstance(exc, Interrupted) else "failed"
            try:
                write_json({**run_info, "status": status, "error": str(exc),
                            "last_checkpoint": str(last) if last else None}, out / "run.json")
            except OSError:  # the disk that failed the run may fail this too; run.json says "running"
                pass
        if isinstance(exc, NonFiniteLoss) and main:
            raise NonFiniteLoss(f"{exc}. The weights of later steps are not saved; the last complete checkpoint is "
                                f"{last or 'none'}. Lower lr, use fp32 or bf16 instead of fp16, or set grad_clip, "
                                "then start again (or --resume with the same settings to retry from it)") from exc
        raise
    finally:
        gpu_summary = gpu.stop()
    train_s = time.perf_counter() - t_train
    skipped = _skip_totals(streams, distributed, device)
    if use_ds:
        state = _full_state_dict(train.towers, train.buffers, train.shapes)  # every rank takes part
        if not main:
            D.barrier()
            return None
        student = load_model(cfg.model, None, device=device).model
        student.load_state_dict(state)
    student.eval()
    if method.finish is not None:
        ctx.student = student
        method.finish(ctx, student)
    after = run_eval(student)
    export_open_clip(student, out / "model.pt", dtype=torch.bfloat16 if cfg.export_precision == "bf16" else torch.float32,
                     meta={"model": cfg.model, "method": cfg.method, "steps": cfg.steps, "source": cfg.pretrained,
                           "world_size": world, "precision": cfg.export_precision})
    report = {
        "method": cfg.method,
        "model": cfg.model,
        "config": cfg.to_dict(),
        "steps": cfg.steps,
        "wall_s": time.perf_counter() - t_start,
        "train_s": train_s,
        "resumed_from": decision,
        "before": before,
        "after": after,
        "final_losses": {k: v for k, v in rows[-1].items() if k not in ("step", "lr", "steps_per_s", "elapsed_s")},
        "checkpoint": str(out / "model.pt"),
        "method_details": ctx.report,
        # The original model's embeddings: "cache" (built or reused in cache_s seconds) or "live".
        "teacher": {"mode": cfg.teacher if method.uses_teacher else None, "cached": sorted(caches),
                    "cache_s": cache_s},
        # Samples skipped as bad data, by kind (data.SKIP_KINDS), over all ranks.
        "data": {"skipped": skipped},
        # GPU utilisation, memory, power, clocks (NVML) and the share of step time spent waiting
        # for data, both measured during training (this process's part of a resumed run).
        "telemetry": {"gpu": gpu_summary, "data": data_wait.summary()},
    }
    if "zeroshot" in after:
        record_eval(cfg.steps, after["zeroshot"])
    atomic_write_bytes("".join(json.dumps(r) + "\n" for r in eval_rows).encode(), out / "eval.jsonl")
    if writer is not None:
        writer.close()
    write_json(report, out / "report.json")
    write_json({**run_info, "status": "finished"}, out / "run.json")
    if use_ds:
        D.barrier()
    return report


def _skip_totals(streams: dict, distributed: bool, device: torch.device) -> Dict[str, Dict[str, int]]:
    """Bad-sample counts per stream, summed over ranks (collective when distributed)."""
    counts = torch.tensor([[b.skipped()[k] for k in SKIP_KINDS] for b in streams.values()], dtype=torch.int64,
                          device=device).reshape(len(streams), len(SKIP_KINDS))
    if distributed:
        torch.distributed.all_reduce(counts)
    return {name: dict(zip(SKIP_KINDS, map(int, row))) for name, row in zip(streams, counts.tolist())}
