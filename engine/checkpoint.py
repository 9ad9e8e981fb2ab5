"""Crash-safe writes, training checkpoints (their directories, manifests, and what resuming from
one needs: which to take, whether the run may continue from it, RNG state), and
open_clip-loadable exports."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import UnlearnConfig

__all__ = ["atomic_write_bytes", "atomic_save", "write_json", "write_errors", "export_open_clip", "CHECKPOINTS",
           "begin_checkpoint", "commit_checkpoint", "complete_checkpoints", "checkpoint_problem", "find_checkpoint",
           "read_manifest", "library_versions", "input_fingerprint", "resume_problems", "find_resume_point",
           "rng_state", "set_rng_state"]

log = logging.getLogger("cliperase")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def write_errors(what: str, where: Path):
    """Failures writing `what` under `where` surface as one OSError that says what happened. On
    a full disk torch.save's writer raises RuntimeError ("unexpected pos ..."), not ENOSPC: a
    write that fails with the disk (nearly) full is reported as ENOSPC."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        try:
            free = shutil.disk_usage(Path(where) if Path(where).exists() else Path(where).parent).free
        except OSError:
            free = None
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or (free is not None and free < (1 << 20)):
            raise OSError(errno.ENOSPC, f"No space left on device writing {what} in {where}") from exc
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"cannot write {what} in {where}: {exc.strerror or exc}") from exc
        raise OSError(f"cannot write {what} in {where}: {exc}") from exc


def _atomic(path: Path, write) -> None:
    """Write to a temporary sibling, fsync, rename: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with write_errors(path.name, path.parent), open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_bytes(data: bytes, path: Path) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_save(obj: Any, path: Path) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def write_json(obj: Any, path: Path) -> None:
    """Strict JSON, atomically: a NaN or Inf anywhere raises ValueError instead of writing a file
    that JSON readers refuse (and that would hide an empty metric as a number)."""
    atomic_write_bytes((json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode(), path)


def export_open_clip(model: nn.Module, path: Path, *, dtype: torch.dtype = torch.float32, meta: Optional[dict] = None) -> Path:
    """Save a plain state dict that `open_clip.create_model(name, pretrained=path)` loads.

    `meta` (model name, method, step...) goes to a JSON sidecar `path.json`, keeping the
    checkpoint itself a bare state dict that any open_clip version reads with weights_only.
    """
    # No copy where the dtype and device already fit: a ViT-H's fp32 export would otherwise hold
    # the model twice. contiguous(): torch.save writes a view's whole storage.
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    atomic_save(state, path)
    if meta is not None:
        write_json(meta, Path(str(path) + ".json"))
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Training checkpoints: <output_dir>/checkpoints/step_<N>/, complete only with a verified manifest.

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def begin_checkpoint(root: Path, step: int) -> Path:
    """A fresh temporary directory for step `step`'s files (rank 0 calls it; others wait at a
    barrier). A leftover of an interrupted write under the same name is removed first."""
    tmp = Path(root) / f".step_{step:08d}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    for leftover in Path(root).glob(".step_*.removing"):  # a removal a crash cut short
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _remove_checkpoint(path: Path) -> None:
    """Delete a complete checkpoint so that a crash midway cannot leave a `step_<N>` directory
    with a manifest and missing files: renamed out of the `step_<N>` names first (atomic), then
    deleted; begin_checkpoint clears what a crash leaves of it."""
    doomed = path.parent / f".{path.name}.removing"
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    _fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def commit_checkpoint(tmp: Path, manifest: dict, *, keep: int) -> Path:
    """Seal a checkpoint written into `tmp` (every rank's files complete): fsync its files, write
    the manifest with each file's size and sha256 last, rename to `step_<N>` and fsync the parent.
    A crash at any point leaves either a `.partial` directory (ignored, removed on the next
    write) or a complete checkpoint. Then removes complete checkpoints beyond the newest `keep`."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync_file(path)
        files[str(path.relative_to(tmp))] = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
    for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}):
        _fsync_dir(d)
    write_json({**manifest, "files": files}, tmp / MANIFEST)
    final = tmp.parent / f"step_{manifest['step']:08d}"
    if final.exists():  # a checkpoint of the same step from before a resume: same content by construction
        _remove_checkpoint(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for old in complete_checkpoints(final.parent)[:-keep] if keep > 0 else []:
        _remove_checkpoint(old)
    return final


def complete_checkpoints(root: Path) -> List[Path]:
    """`step_<N>` directories with a manifest, oldest first (not yet verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_problem(path: Path) -> Optional[str]:
    """What is wrong with a checkpoint directory, or None when every file its manifest lists is
    there with the recorded size and sha256."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path}: unreadable manifest ({exc})"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"{path}: {name} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{path}: {name} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if file_digest(f) != meta["sha256"]:
            return f"{path}: {name} does not match its sha256 in the manifest (corrupt)"
    return None


def find_checkpoint(output_dir: Path, which: str) -> Tuple[Optional[Path], List[str]]:
    """The checkpoint to resume from and the problems met on the way.

    `which="latest"`: the newest complete checkpoint under `output_dir/checkpoints` that
    verifies; corrupt ones are passed over (each named in the problems) for the one before.
    None when there is none. Any other value is a checkpoint directory that must verify.
    """
    if which != "latest":
        problem = checkpoint_problem(Path(which)) if (Path(which) / MANIFEST).is_file() else \
            f"{which}: not a complete checkpoint (no {MANIFEST})"
        return (None, [problem]) if problem else (Path(which), [])
    skipped = []
    for path in reversed(complete_checkpoints(Path(output_dir) / CHECKPOINTS)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append(problem)
    return None, skipped


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


# ---------------------------------------------------------------------------------------------
# Resuming: which checkpoint, whether this run may continue it, and the state beside the weights.

def library_versions() -> dict:
    """Python, torch, open_clip and (when installed) deepspeed versions, for run.json and manifests."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name, dist in (("open_clip", "open_clip_torch"), ("deepspeed", "deepspeed")):
        try:  # metadata, not an import: importing deepspeed costs seconds on runs that do not use it
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def input_fingerprint(path: Optional[str]) -> Optional[dict]:
    """Size and modification time of a local pretrained checkpoint: a resumed run checks that
    its original model is the same file (hashing a multi-GB file on every start would cost more)."""
    if path is None or not Path(path).is_file():
        return None
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def resume_problems(trajectory: dict, pretrained: Optional[str], saved: dict, world: int) -> List[str]:
    """Why a run saved as `saved` (run.json or a checkpoint manifest) cannot be continued by a run
    whose trajectory-determining config is `trajectory` (config.trajectory_fields)."""
    problems = []
    old = saved.get("config", {})
    for key in sorted(set(old) | set(trajectory)):
        if key in trajectory and old.get(key, trajectory[key]) != trajectory[key]:
            problems.append(f"{key}: the run being resumed has {old.get(key)!r}, now {trajectory[key]!r} "
                            "(a resumed run must keep every setting that changes its result)")
    if saved.get("world_size", world) != world:
        problems.append(f"world size: the run being resumed ran on {saved['world_size']} ranks, now {world}")
    if saved.get("pretrained_file") and saved["pretrained_file"] != input_fingerprint(pretrained):
        problems.append(f"pretrained: {pretrained} is not the file the run started from "
                        f"(size or modification time changed: {saved['pretrained_file']})")
    return problems


def find_resume_point(resume: Optional[str], out: Path, trajectory: dict, pretrained: Optional[str],
                      world: int) -> Optional[Path]:
    """The checkpoint to continue from (None: start from step 0). Raises ConfigError when
    `resume` names an unusable checkpoint or the saved run differs from this one."""
    if resume is None:
        return None
    path, passed_over = find_checkpoint(out, resume)
    for problem in passed_over:
        log.warning("resume: passing over a checkpoint: %s", problem)
    if path is None:
        if resume != "latest":
            raise ConfigError([f"resume: {p}" for p in passed_over])
        log.warning("resume: no complete checkpoint in %s; starting from step 0", out / CHECKPOINTS)
    saved = read_manifest(path) if path is not None else None
    if saved is None and (out / "run.json").is_file():
        saved = json.loads((out / "run.json").read_text())
    problems = resume_problems(trajectory, pretrained, saved, world) if saved else []
    if problems:
        raise ConfigError(problems)
    return path


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
