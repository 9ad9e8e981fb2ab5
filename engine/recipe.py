"""One unlearning run as an object with named stages (after torchtune's recipes):

    recipe = UnlearnRecipe(cfg)
    recipe.setup()      # ranks, resume point, model, "before" metrics, teacher, method, data, optimizer
    recipe.train()      # the loop, top to bottom; save_checkpoint / load_checkpoint in between
    recipe.finish()     # consolidate, the method's last word, "after" metrics, export, report

`run()` is the three in order, with a failed or interrupted run recorded in run.json. The loop's
host syncs and collectives are marked "sync point" where they happen: the only ones in a step are
on log steps (losses, the gradient check, the stop-signal vote), plus checkpoints.
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dist as D
from .checkpoint import (CHECKPOINTS, atomic_write_bytes, begin_checkpoint, commit_checkpoint, export_open_clip,
                         find_checkpoint, find_resume_point, input_fingerprint, library_versions, read_manifest,
                         rng_state, set_rng_state, write_errors, write_json)
from .config import UnlearnConfig, trajectory_fields
from .data import SKIP_KINDS, PairStream, loader, resolve_shards
from .dist.partitioned import ShardedOriginal, assemble, can_build_partitioned, load_partitioned, sharded_engine
from .dist.ds_config import build_ds_config
from .dist.zero import PRECISION_DTYPES, build_training, full_state_dict, init_process_group, uses_deepspeed
from .errors import ConfigError
from .eval import Evaluator, MembershipAudit
from .methods import STREAMS, RunContext, build_features, get_method
from .models import load_model, train_mode
from .progress import progress_bar
from .stopping import Interrupted, StopSignals
from .teacher_cache import TeacherCache, teacher_rows
from .telemetry import DataWaitTimer, GpuSampler, MemoryPhases, tensorboard_writer
from .trainer import LossLog, NonFiniteLoss, check_gradients, lr_factor, resolve_device

__all__ = ["UnlearnRecipe"]

log = logging.getLogger("cliperase")
_RETAIN_SEED_OFFSET = 1_000_003  # the retain stream's seed is cfg.seed + this: another order than forget's
_HOOK_SEED_OFFSET = 7_000_001  # hooks' own passes over the data (subgroup's Fisher batches) use other seeds


class UnlearnRecipe:
    """`unlearn()`'s run. Every rank builds one and runs the same stages (they are collective
    under DeepSpeed); only rank 0 evaluates and writes the run's files. See engine.api.unlearn
    for what is written."""

    def __init__(self, cfg: UnlearnConfig, *, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / CHECKPOINTS
        self.method = get_method(cfg)
        self._specs = {"forget": (cfg.forget_data, "forget_data", cfg.seed),
                       "retain": (cfg.retain_data, "retain_data", cfg.seed + _RETAIN_SEED_OFFSET)}

    def run(self) -> Optional[dict]:
        """setup, train, finish. Returns the report on rank 0 (None elsewhere)."""
        self.setup()
        try:
            self.train()
        except (Interrupted, NonFiniteLoss, OSError, ConfigError) as exc:  # ConfigError: e.g. every shard vanished
            self._record_failure(exc)
            raise
        finally:
            for batches in self.streams.values():  # their workers are done: free them before the evaluation
                batches.close()
        return self.finish()

    # --- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything the loop needs, in the order that keeps runs reproducible (the model's random
        init, then the data workers' seeds, come from the torch RNG)."""
        self.t_start = time.perf_counter()
        self._setup_distributed()
        self._setup_resume()
        self.memory = MemoryPhases()  # this rank's peak RSS per phase: memory/rank_<r>.step_<start>.json
        self._setup_model()
        self._phase("before evaluation")
        if self.main:
            self._setup_output()
        self._setup_teacher_model()
        self._setup_method()
        self._setup_teacher_cache()
        self._phase("teacher cache")
        self._setup_training()
        self._setup_data()

    def _setup_distributed(self) -> None:
        self.use_ds = uses_deepspeed(self.cfg)
        self.device = resolve_device(self.cfg.device)
        if self.use_ds:
            self.device = init_process_group(self.cfg, self.device)
        self.rank, self.world, self.main = D.rank(), D.world_size(), D.is_main()
        self.distributed = self.world > 1

    def _setup_resume(self) -> None:
        """Which checkpoint to continue from (rank 0 looks and verifies, every rank follows) and
        what it holds: this rank's state (streams, RNG, method state) and rank 0's run state."""
        cfg = self.cfg
        try:
            found = (find_resume_point(cfg.resume, self.out, trajectory_fields(cfg), cfg.pretrained, self.world)
                     if self.main else None)
            decision = str(found) if found else None
        except ConfigError as exc:
            decision = exc
        decision = D.broadcast(decision)  # sync point: every rank resumes from what rank 0 chose
        if isinstance(decision, ConfigError):
            raise decision
        self.resume_from = Path(decision) if decision else None
        self.rank_state, self.run_state, self.start_step = {}, {}, 0
        if self.resume_from is not None:
            load = lambda name: torch.load(self.resume_from / name, map_location="cpu", weights_only=False)  # noqa: E731
            self.rank_state = load(f"rank_{self.rank}.pt")
            self.run_state = load("run_state.pt") if self.main else {}
            self.start_step = read_manifest(self.resume_from)["step"]

    def _setup_model(self) -> None:
        cfg = self.cfg
        self.run_info = {"status": "running", "config": cfg.to_dict(), "versions": library_versions(),
                         "world_size": self.world, "pretrained_file": input_fingerprint(cfg.pretrained),
                         "resumed_from": str(self.resume_from) if self.resume_from else None}
        torch.manual_seed(cfg.seed)
        # ZeRO-3 from a checkpoint file: student and original built partitioned, no rank ever
        # holding either whole (dist.partitioned); otherwise the whole model, sharded later if at all.
        self.partitioned = self.use_ds and cfg.zero_stage == 3 and can_build_partitioned(cfg.pretrained)
        self.original = None
        if self.partitioned:
            self._load_partitioned()
        else:
            self.loaded = load_model(cfg.model, cfg.pretrained, device=self.device)
        self.student = self.loaded.model
        self._phase("model load")
        self.evaluate = Evaluator(self.loaded.preprocess, self.loaded.tokenizer, cfg.forget_classes,
                                  cfg.forget_attributes, default_root=cfg.eval_data, batch_size=cfg.eval_batch_size)
        self.audit = None
        if cfg.audit_data and (self.main or self.original is not None):  # every rank through a sharded original
            self.audit = MembershipAudit(self.loaded.preprocess, self.loaded.tokenizer, cfg.forget_data, cfg.audit_data,
                                         batch_size=cfg.eval_batch_size)
        if self.resume_from:
            self.before = self.run_state.get("before")
        elif self.original is not None:  # collective: every rank runs the evaluation through the sharded original
            before = self._scored(self.original)
            self.before = before if self.main else None
        elif self.main:
            self.before = self._scored(self.student)

    def _load_partitioned(self) -> None:
        """The student in the run's precision, and the frozen original as a ZeRO-3 inference
        engine: fp32 for the "before" evaluation and the teacher-cache pass (as a whole model
        would give them), the run's precision when it is also the live teacher."""
        cfg = self.cfg
        ds_config = build_ds_config(cfg, self.world)
        dtype = PRECISION_DTYPES.get(cfg.precision, torch.float32)
        self.loaded = load_partitioned(cfg.model, cfg.pretrained, ds_config, dtype=dtype,
                                       train_logit_scale=cfg.train_logit_scale)
        live = self.method.uses_teacher and cfg.teacher == "live"
        odtype = dtype if live else torch.float32
        oconfig = ds_config if live else {**ds_config, "bf16": {"enabled": False}, "fp16": {"enabled": False}}
        clip = load_partitioned(cfg.model, cfg.pretrained, oconfig, dtype=odtype, train_logit_scale=False).model
        self.original = ShardedOriginal(sharded_engine(clip, oconfig, odtype))

    def _setup_output(self) -> None:
        """Files appear only once the model and data have loaded: a refused input leaves no run behind."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resume_from is None:
            # A fresh start (or --overwrite): another run's checkpoints and curves would be taken
            # for this one's. The teacher cache stays: it is keyed by what it was computed from.
            for stale in (self.ckpt_root, self.out / "tensorboard"):
                shutil.rmtree(stale, ignore_errors=True)
        # The log holds exactly the steps the weights have seen: rows past the checkpoint (work a
        # crash lost) go.
        history = self.run_state.get("history", [])
        atomic_write_bytes("".join(json.dumps(r) + "\n" for r in history).encode(), self.out / "log.jsonl")
        write_json(self.run_info, self.out / "run.json")

    def _setup_teacher_model(self) -> None:
        """The frozen original (when the method compares with it) and the student's training mode.
        s is the original's temperature, frozen unless asked otherwise (METHOD.md)."""
        student = self.student
        if self.original is None:
            student.logit_scale.requires_grad_(self.cfg.train_logit_scale)
            self.frozen_scale = student.logit_scale.detach().exp().clone()
            self.teacher = copy.deepcopy(student).requires_grad_(False).eval() if self.method.uses_teacher else None
        else:  # the student's logit_scale is a shard of a 1-element parameter when trained; the original's is whole.
            # (No method that reads the original's modules runs under ZeRO-3: preflight refuses it.)
            self.frozen_scale = self.original.engine.module.clip.logit_scale.detach().float().exp().clone()
            self.teacher = self.original if self.method.uses_teacher else None
        train_mode(student)
        if self.cfg.grad_checkpointing:
            student.set_grad_checkpointing(True)

    def _setup_method(self) -> None:
        self.ctx = RunContext(cfg=self.cfg, student=self.student, teacher=self.teacher, tokenizer=self.loaded.tokenizer,
                              device=self.device, batches=lambda which: self._batches(which, hook=True),
                              evaluate=self.evaluate if self.main else None,
                              state=dict(self.rank_state.get("method_state", {})))
        self.method.setup(self.ctx)  # may freeze parameters: before any optimizer exists

    def _setup_teacher_cache(self) -> None:
        """The teacher's embeddings of the training samples, once, instead of a second model
        forward every step; afterwards the teacher leaves the accelerator (on the CPU when the
        method's hooks still read it)."""
        cfg, self.caches = self.cfg, {}
        t0 = time.perf_counter()
        if self.teacher is not None and cfg.teacher == "cache":
            for name in (s for s in ("retain", "forget") if s in self.method.teacher_streams):
                spec, what, _ = self._specs[name]
                self.caches[name] = TeacherCache.build_or_load(
                    self.out / "teacher_cache", name, resolve_shards(spec, what), self.teacher, self.loaded.preprocess,
                    self.loaded.tokenizer, device=self.device, precision=cfg.teacher_cache_precision,
                    batch_size=cfg.eval_batch_size, progress=self.progress)
            self.teacher = self.ctx.teacher = self.teacher.to("cpu") if self.method.needs_teacher_model else None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if self.original is not None and self.teacher is not self.original:  # its embeddings are all that was needed
            self.original.close()
            self.original = None
        self.cache_s = time.perf_counter() - t0

    def _setup_training(self) -> None:
        cfg = self.cfg
        lr_fn = lambda s: lr_factor(s, steps=cfg.steps, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule)  # noqa: E731
        self.training = build_training(cfg, self.student, self.teacher, live_teacher=not self.caches,
                                       use_ds=self.use_ds, world=self.world,
                                       ds_config_path=self.out / "ds_config.json" if self.main else None, lr_fn=lr_fn)
        self.stepper = self.training.stepper
        self._phase("engine init")
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
            self._phase("resume load")

    def _setup_data(self) -> None:
        """The training streams (from the checkpoint's positions on resume), the loss log, curves."""
        saved = self.rank_state.get("streams", {})
        self.streams = {name: self._batches(name, start=saved.get(name)) for name in STREAMS
                        if name in self.method.streams}
        self.data_wait = DataWaitTimer()
        self.timed = {name: self.data_wait.wrap(b) for name, b in self.streams.items()}
        self.losses = LossLog(self.out / "log.jsonl" if self.main else None, self.run_state.get("history", []),
                              start_step=self.start_step)
        self.eval_rows = list(self.run_state.get("eval_rows", []))
        # Curves: losses on log steps and zero-shot accuracy every eval_every steps, to TensorBoard
        # (runs/<dir>/tensorboard) and, for plots without TensorBoard, eval.jsonl.
        self.writer = tensorboard_writer(self.out / "tensorboard") if self.main else None
        if self.main and "zeroshot" in self.before and self.resume_from is None:
            self._record_eval(0, self.before["zeroshot"])
        self.signals = StopSignals()

    def _batches(self, name: str, *, start: Optional[dict] = None, hook: bool = False):
        """A batch iterator of this rank's share of stream `name`; `hook`: a separate pass for a
        method's hook (other seed, in this process), leaving the training streams' positions alone."""
        spec, what, seed = self._specs[name]
        cfg = self.cfg
        stream = PairStream(resolve_shards(spec, what), self.loaded.preprocess, self.loaded.tokenizer, cfg.batch_size,
                            seed=seed + (_HOOK_SEED_OFFSET if hook else 0), what=what, rank=self.rank,
                            world=self.world, start=start, resampled=cfg.resampled, split=cfg.data_split,
                            teacher=None if hook or name not in self.caches else self.caches[name].rows)
        return loader(stream, 0 if hook else cfg.data_workers, pin_memory=self.device.type == "cuda",
                      device=self.device)

    # --- train -------------------------------------------------------------------------------

    def train(self) -> None:
        """`cfg.steps` optimizer steps from the resume point (0 on a fresh run)."""
        cfg = self.cfg
        bar = progress_bar(range(self.start_step, cfg.steps), desc=f"unlearn[{cfg.method}]",
                           enabled=self.progress and self.main, initial=self.start_step, total=cfg.steps)
        self.t_train = time.perf_counter()
        self.losses.restart_clock()
        gpu = GpuSampler(interval_s=2.0).start()  # says once and carries on when there is no GPU or NVML
        try:
            with self.signals:
                for step in bar:  # `step` optimizer steps are done; this one makes step + 1
                    log_step = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
                    with self.data_wait.step():
                        self._optimizer_step(step, log_step)
                    self._phase("training step", step=step + 1)
                    # sync point (log steps): the step's losses to the host, the global batch's under DeepSpeed
                    row = self.losses.row(step + 1, self.stepper) if log_step else None
                    self.losses.next_step()
                    if row is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}")
                    self._after_step(step + 1, row)
        finally:
            self.gpu_summary = gpu.stop()
            bar.close()
        self.train_s = time.perf_counter() - self.t_train

    def _optimizer_step(self, step: int, log_step: bool) -> None:
        """`accum_steps` micro-batches: forward, losses, backward, and the update at the last."""
        accum = self.cfg.accum_steps
        for micro in range(accum):
            losses = self._loss_step(step)
            self.stepper.backward(losses["loss"])
            if log_step and micro == accum - 1:
                check_gradients(self.stepper, step + 1, losses)  # sync point: before the update reaches the weights
            self.stepper.step()
            self.losses.add(losses)

    def _loss_step(self, step: int) -> Dict[str, Tensor]:
        """One micro-batch of every stream the method reads -> the method's named losses."""
        batches = {name: next(timed) for name, timed in self.timed.items()}
        # One forward over forget + retain rows: the towers have no batch-coupled layers.
        images = torch.cat([b[0] for b in batches.values()]).to(self.device, non_blocking=True)
        texts = torch.cat([b[1] for b in batches.values()]).to(self.device, non_blocking=True)
        img, txt, scale = self.training.forward(images, texts)
        rows = {name: len(b[0]) for name, b in batches.items()}
        teacher = {name: self._teacher_rows(name, images, texts, rows) for name in self.method.teacher_streams}
        f = build_features(rows, img, txt, tokens=texts, teacher=teacher,
                           logit_scale=scale if self.cfg.train_logit_scale else self.frozen_scale,
                           teacher_logit_scale=self.frozen_scale, step=step, state=self.ctx.state,
                           mask_captions=self.cfg.mask_duplicate_captions)
        return self.method.objective(f)

    def _teacher_rows(self, name: str, images: Tensor, texts: Tensor, rows: Dict[str, int]):
        """Normalised teacher (image, text) rows of stream `name`'s part of the batch: the cache's,
        which came with the batch from the data worker, or computed by the live teacher."""
        if name in self.caches:
            return teacher_rows(self.streams[name].last_teacher, self.device)
        names = list(rows)
        start = sum(rows[n] for n in names[:names.index(name)])
        part = slice(start, start + rows[name])
        with torch.no_grad():
            t_img, t_txt = self.training.encode_teacher(images[part], texts[part])
        return F.normalize(t_img.float(), dim=-1), F.normalize(t_txt.float(), dim=-1)

    def _after_step(self, step: int, row: Optional[dict]) -> None:
        """After optimizer step `step` (1-based): curves, the method's hook, periodic evaluation,
        checkpoints, and stopping on a signal."""
        cfg = self.cfg
        if row is not None and self.writer is not None:
            for k, v in row.items():
                if k != "step":
                    self.writer.add_scalar(f"train/{k}", v, step)
        self.method.after_step(self.ctx, step)
        if self.main and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            self._record_eval(step, self.evaluate(self.student)["zeroshot"])
            train_mode(self.student)  # evaluation restores plain train mode, BatchNorm included
        saved = None
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            saved = self.save_checkpoint(step)
        # sync point: ranks agree on stopping on log steps only (a collective); one process checks every step.
        if (not self.distributed or row is not None) and (signum := self.signals.agreed(self.distributed, self.device)):
            raise Interrupted(signum, step, saved or self.save_checkpoint(step))

    def _record_eval(self, step: int, zeroshot: dict) -> None:
        self.eval_rows.append({"step": step, **zeroshot})
        if self.writer is not None:
            for k, v in zeroshot.items():
                if v is not None:  # a part without images has no accuracy
                    self.writer.add_scalar(f"eval/{k}", v, step)

    # --- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> Path:
        """Collective. Every rank writes its model/optimizer shard, stream positions, RNG and the
        method's state; rank 0 the run's history; rank 0 seals it once all are written."""
        tmp = self.ckpt_root / f".step_{step:08d}.partial"
        if self.main:
            begin_checkpoint(self.ckpt_root, step)
        D.barrier()
        try:
            with write_errors(f"checkpoint step {step}", self.ckpt_root):
                self.stepper.save(tmp)
                torch.save({"streams": {k: b.state() for k, b in self.streams.items()}, "rng": rng_state(),
                            "method_state": self.ctx.state}, tmp / f"rank_{self.rank}.pt")
                if self.main:
                    torch.save({"before": self.before, "history": self.losses.rows, "eval_rows": self.eval_rows},
                               tmp / "run_state.pt")
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; complete checkpoints stay
            raise
        D.barrier()
        final = self.ckpt_root / f"step_{step:08d}"
        if self.main:
            cfg = self.cfg
            final = commit_checkpoint(tmp, {"step": step, "steps": cfg.steps, "config": cfg.to_dict(),
                                            "world_size": self.world, "versions": library_versions(),
                                            "pretrained_file": self.run_info["pretrained_file"],
                                            "data": {k: b.state() for k, b in self.streams.items()},
                                            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                      keep=cfg.keep_checkpoints)
        D.barrier()
        self._phase("checkpoint", step=step)
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Collective. The model, optimizer and lr schedule from `path`, and this rank's RNG."""
        self.stepper.load(path)
        set_rng_state(self.rank_state["rng"])
        log.info("resumed from %s (step %d of %d)", path, self.start_step, self.cfg.steps)

    def _record_failure(self, exc: BaseException) -> None:
        """run.json says why the run stopped and where to resume; a non-finite loss is re-raised
        with what to do about it."""
        if not self.main:
            return
        last = find_checkpoint(self.out, "latest")[0]
        status = "interrupted" if isinstance(exc, Interrupted) else "failed"
        try:
            write_json({**self.run_info, "status": status, "error": str(exc),
                        "last_checkpoint": str(last) if last else None}, self.out / "run.json")
        except OSError:  # the disk that failed the run may fail this too; run.json says "running"
            pass
        if isinstance(exc, NonFiniteLoss):
            raise NonFiniteLoss(f"{exc}. The weights of later steps are not saved; the last complete checkpoint is "
                                f"{last or 'none'}. Lower lr, use fp32 or bf16 instead of fp16, or set grad_clip, "
                                "then start again (or --resume with the same settings to retry from it)") from exc

    # --- finish ------------------------------------------------------------------------------

    def finish(self) -> Optional[dict]:
        """The trained model's last stage: consolidated (DeepSpeed), the method's `finish`, the
        "after" metrics, model.pt and report.json (rank 0). Collective under DeepSpeed."""
        skipped = self._skip_totals()
        student = self._consolidated()
        self._phase("consolidation")
        if not self.main:
            D.barrier()
            return None
        student.eval()
        self.ctx.student = student
        self.method.finish(self.ctx, student)
        after = self._scored(student)
        cfg = self.cfg
        export_open_clip(student, self.out / "model.pt",
                         dtype=torch.bfloat16 if cfg.export_precision == "bf16" else torch.float32,
                         meta={"model": cfg.model, "method": cfg.method, "steps": cfg.steps, "source": cfg.pretrained,
                               "world_size": self.world, "precision": cfg.export_precision})
        report = self._report(after, skipped)
        if "zeroshot" in after:
            self._record_eval(cfg.steps, after["zeroshot"])
        atomic_write_bytes("".join(json.dumps(r) + "\n" for r in self.eval_rows).encode(), self.out / "eval.jsonl")
        if self.writer is not None:
            self.writer.close()
        write_json(report, self.out / "report.json")
        write_json({**self.run_info, "status": "finished"}, self.out / "run.json")
        self._phase("evaluation and export")
        D.barrier()
        return report

    def _phase(self, name: str, **extra) -> None:
        """End phase `name` of this rank's memory record and rewrite memory/rank_<r>.step_<start>.json
        (every phase, so a killed run keeps the record up to its last phase)."""
        self.memory.end(name, **extra)
        write_json({"rank": self.rank, "world_size": self.world, "model": self.cfg.model, "precision": self.cfg.precision,
                    "zero_stage": self.cfg.zero_stage, "partitioned": self.partitioned, "start_step": self.start_step,
                    "phases": self.memory.rows}, self.out / "memory" / f"rank_{self.rank}.step_{self.start_step}.json")

    def _consolidated(self):
        """The trained model as a plain fp32 open_clip module on rank 0 (None elsewhere), assembled
        from the gathered state without a second copy."""
        if not self.use_ds:
            return self.student
        state = full_state_dict(self.training, keep=self.main)  # sync point: every rank takes part
        if not self.main:
            return None
        return assemble(self.cfg.model, state).to(self.device)

    def _scored(self, model) -> dict:
        """The before/after block: the evaluation, and the membership audit when audit_data is set."""
        out = self.evaluate(model)
        if self.audit is not None:
            out["audit"] = self.audit(model)
        return out

    def _report(self, after: dict, skipped: dict) -> dict:
        cfg, rows = self.cfg, self.losses.rows
        return {
            "method": cfg.method,
            "model": cfg.model,
            "config": cfg.to_dict(),
            "steps": cfg.steps,
            "wall_s": time.perf_counter() - self.t_start,
            "train_s": self.train_s,
            "resumed_from": self.run_info["resumed_from"],
            "before": self.before,
            "after": after,
            "final_losses": {k: v for k, v in rows[-1].items() if k not in ("step", "lr", "steps_per_s", "elapsed_s")},
            "checkpoint": str(self.out / "model.pt"),
            "method_details": self.ctx.report,
            # The original model's embeddings: "cache" (built or reused in cache_s seconds) or "live".
            "teacher": {"mode": cfg.teacher if self.method.uses_teacher else None, "cached": sorted(self.caches),
                        "cache_s": self.cache_s},
            # Samples skipped as bad data, by kind (data.SKIP_KINDS), over all ranks.
            "data": {"skipped": skipped},
            # GPU utilisation, memory, power, clocks (NVML) and the share of step time spent waiting
            # for data, both measured during training (this process's part of a resumed run).
            "telemetry": {"gpu": self.gpu_summary, "data": self.data_wait.summary()},
        }

    def _skip_totals(self) -> Dict[str, Dict[str, int]]:
        """Bad-sample counts per stream, summed over ranks (sync point when distributed)."""
        counts = torch.tensor([[b.skipped()[k] for k in SKIP_KINDS] for b in self.streams.values()], dtype=torch.int64,
                              device=self.device).reshape(len(self.streams), len(SKIP_KINDS))
        if self.distributed:
            torch.distributed.all_reduce(counts)
        return {name: dict(zip(SKIP_KINDS, map(int, row))) for name, row in zip(self.streams, counts.tolist())}
