"""One registry of shapes, providers and measurements for the kernel benchmarks.

`bench_clip_infonce.py`, `bench_consistency_kl.py` and `bench_cliperase_loss.py` mirror the three
kernels; each parametrises over `cases(loss)`: providers x modes (fwd, bwd, fwd+bwd) x shapes.

Timing: pytest-benchmark `pedantic`, the device synchronised inside the timed call. For "bwd"
the forward runs in the (untimed) setup.

Peak memory, stated per device:
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the bytes
  allocated before the call (inputs excluded), measured in-process around one fwd+bwd.
- CPU: torch has no allocator statistics on CPU, so each measurement runs in a fresh Python
  process (`python -m benchmarks._registry ...`): after the inputs are built it resets the
  kernel's peak-RSS mark (`/proc/self/clear_refs` <- 5), reads VmRSS, runs one fwd+bwd and
  reports `VmHWM - VmRSS_before`: the peak resident memory the call added, gradients included
  (`exact: false` in the record if the reset was refused; then it is an upper bound).

Large shapes (anything above N=4096) are skipped on CPU; the only large CPU case is the
memory comparison at N=16384 in `bench_clip_infonce.py`.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parent.parent

NS = (4096, 16384, 32768, 65536)  # global batch N
DS = (768, 1024)  # embedding width: ViT-L-14 / ViT-H-14
MODES = ("fwd", "bwd", "fwd+bwd")
CPU_MAX_N = 4096  # a CPU run should finish in minutes on 2 cores
CPU_DS = (768,)
SCALE = 100.0  # CLIP's clamp value of exp(logit_scale), the peakiest softmax in training

PROVIDERS = {
    "clip_infonce": ("naive", "open_clip", "chunked", "triton", "inf_cl"),
    "consistency_kl": ("naive", "chunked", "triton"),
    "cliperase_loss": ("naive", "chunked", "triton"),
}
PROVIDER_DOC = {
    "naive": "the materialised reference (`*_ref`, upcast=False): full N x N logits in the input dtype",
    "open_clip": "open_clip.loss.ClipLoss (single process: logits both ways, cross-entropy)",
    "chunked": "impl='chunked': plain-torch tiles, LSEs saved, logits recomputed in backward",
    "triton": "impl='triton': the fused kernels of kernels/_triton_contrastive.py",
    "inf_cl": "Inf-CL's cal_inf_loss, once per direction (the published two-direction usage)",
}


@dataclass(frozen=True)
class Case:
    loss: str
    provider: str
    mode: str
    n: int
    d: int

    @property
    def id(self) -> str:
        return f"{self.provider}-{self.mode}-N{self.n}-d{self.d}"


def cases(loss: str) -> List[Case]:
    return [Case(loss, p, m, n, d) for p in PROVIDERS[loss] for m in MODES for n in NS for d in DS]


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_for(dev: str) -> torch.dtype:
    # bf16 is the training dtype on GPU; CPU GEMMs run (and are compared) in fp32.
    return torch.bfloat16 if dev == "cuda" else torch.float32


# Bytes the materialised losses (naive, open_clip's ClipLoss) hold per logit at their fwd+bwd
# peak in bf16 on CUDA: ~15.5 for InfoNCE (LIMITS.md, from Inf-CL's table); the KL losses hold
# 2.6x (consistency_kl) and 3.1x (cliperase_loss) that: the naive peaks measured side by side on
# CPU (results/cpu-kernels.json, N=4096: 754 and 907 MiB against 293 MiB).
MATERIALISED_BYTES_PER_LOGIT = {"clip_infonce": 15.5, "consistency_kl": 15.5 * 2.6, "cliperase_loss": 15.5 * 3.1}


def skip_reason(case: Case, dev: str, *, any_shape: bool = False) -> Optional[str]:
    """Why this case cannot run here, or None. `any_shape` lifts the CPU shape grid (the GPU
    kit's dry run times tiny shapes on CPU)."""
    if dev == "cpu" and not any_shape and (case.n > CPU_MAX_N or case.d not in CPU_DS):
        return f"N={case.n}, d={case.d} is a GPU shape (CPU runs only N<={CPU_MAX_N}, d in {CPU_DS})"
    if case.provider in ("triton", "inf_cl") and dev != "cuda":
        return f"{case.provider} needs a CUDA GPU"
    if case.provider == "inf_cl":
        try:
            import inf_cl  # noqa: F401
        except ImportError:
            return "inf_cl is not installed (pip install inf_cl; needs CUDA)"
    if case.provider in ("naive", "open_clip") and dev == "cuda":
        # Skip what cannot fit instead of failing with OOM.
        need = MATERIALISED_BYTES_PER_LOGIT[case.loss] * case.n * case.n
        free, _ = torch.cuda.mem_get_info()
        if need > 0.9 * free:
            return (f"{case.provider} {case.loss} needs ~{need / 2 ** 30:.0f} GiB at N={case.n} "
                    f"({MATERIALISED_BYTES_PER_LOGIT[case.loss]:.1f} B/logit), {free / 2 ** 30:.0f} GiB free")
    return None


def one_rank_group() -> None:
    """A one-process torch.distributed group (NCCL on CUDA, gloo on CPU) unless one exists:
    Inf-CL's `cal_inf_loss` all-reduces the scale's gradient in backward."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


def make_inputs(loss: str, n: int, d: int, dev: str, dtype: torch.dtype, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Student leaves (requires_grad) and, for the KL losses, a frozen teacher; L2-normalised."""
    gen = torch.Generator(device=dev).manual_seed(seed)

    def emb(grad: bool) -> torch.Tensor:
        x = torch.randn(n, d, generator=gen, device=dev, dtype=torch.float32)
        x.div_(x.norm(dim=1, keepdim=True))  # in place: keeps the CPU RSS baseline honest
        return x.to(dtype).requires_grad_(grad)

    out = {"zi": emb(True), "zt": emb(True)}
    if loss != "clip_infonce":
        out.update(zi0=emb(False), zt0=emb(False))
    return out


def loss_fn(loss: str, provider: str) -> Callable[[Dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """A callable (inputs, logit_scale) -> one scalar to back-propagate."""
    from cliperase.kernels import (
        clip_infonce, clip_infonce_ref, cliperase_loss, cliperase_loss_ref, consistency_kl, consistency_kl_ref,
    )

    if loss == "clip_infonce":
        if provider == "naive":
            return lambda x, s: clip_infonce_ref(x["zi"], x["zt"], s, upcast=False)
        if provider == "open_clip":
            from open_clip.loss import ClipLoss

            clip_loss = ClipLoss()
            return lambda x, s: clip_loss(x["zi"], x["zt"], s).float()
        if provider == "inf_cl":
            from inf_cl import cal_inf_loss

            one_rank_group()
            return lambda x, s: (cal_inf_loss(x["zi"], x["zt"], scale=s) + cal_inf_loss(x["zt"], x["zi"], scale=s)) / 2
        return lambda x, s: clip_infonce(x["zi"], x["zt"], s, impl=provider)
    if loss == "consistency_kl":
        if provider == "naive":
            return lambda x, s: consistency_kl_ref(x["zi"], x["zt"], x["zi0"], x["zt0"], s, upcast=False)
        return lambda x, s: consistency_kl(x["zi"], x["zt"], x["zi0"], x["zt0"], s, impl=provider)
    if loss == "cliperase_loss":
        if provider == "naive":
            return lambda x, s: sum(cliperase_loss_ref(x["zi"], x["zt"], x["zi0"], x["zt0"], s, upcast=False))
        return lambda x, s: sum(cliperase_loss(x["zi"], x["zt"], x["zi0"], x["zt0"], s, impl=provider))
    raise ValueError(f"loss: expected one of {list(PROVIDERS)}, got {loss!r}")


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def environment() -> Dict[str, object]:
    """Versions and hardware to store with every result."""
    info: Dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import open_clip

        info["open_clip"] = open_clip.__version__
    except ImportError:
        info["open_clip"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, sms=props.multi_processor_count,
                    cuda=torch.version.cuda)
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as exc:  # noqa: BLE001 - a missing NVML must not lose the result
            info["driver"] = f"unavailable ({type(exc).__name__})"
    else:
        info["gpu"] = None
    return info


def timed_call(case: Case, dev: str):
    """(setup, target) for `benchmark.pedantic`: setup builds fresh leaves (and the forward for
    "bwd"); target runs the timed part and synchronises."""
    dtype = dtype_for(dev)
    inputs = make_inputs(case.loss, case.n, case.d, dev, dtype)
    fn = loss_fn(case.loss, case.provider)
    scale = torch.tensor(SCALE, device=dev, requires_grad=True)

    def fresh():
        for t in inputs.values():
            t.grad = None
        scale.grad = None

    if case.mode == "fwd":
        def setup():
            fresh()
            return (), {}

        def target():
            with torch.no_grad():
                out = fn(inputs, scale)
            sync(dev)
            return out
    elif case.mode == "bwd":
        def setup():
            fresh()
            out = fn(inputs, scale)
            sync(dev)
            return (out,), {}

        def target(out):
            out.backward()
            sync(dev)
    else:
        def setup():
            fresh()
            return (), {}

        def target():
            fn(inputs, scale).backward()
            sync(dev)

    return setup, target


def cuda_peak_bytes(case: Case) -> int:
    """Peak bytes allocated by one fwd+bwd beyond the inputs, on the current CUDA device."""
    inputs = make_inputs(case.loss, case.n, case.d, "cuda", dtype_for("cuda"))
    fn = loss_fn(case.loss, case.provider)
    scale = torch.tensor(SCALE, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(inputs, scale).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def cpu_peak_bytes(case: Case, timeout: float = 900.0) -> Dict[str, object]:
    """Run one fwd+bwd of `case` in a fresh process; see the module docstring."""
    args = json.dumps(dict(loss=case.loss, provider=case.provider, n=case.n, d=case.d))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks._registry", args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory child failed for {case}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_case(benchmark, case: Case, rounds_cpu: int = 2, rounds_cuda: int = 10) -> None:
    """The body of every timed benchmark: skip what cannot run here, time, record extra_info."""
    import pytest

    dev = device()
    reason = skip_reason(case, dev)
    if reason:
        pytest.skip(reason)
    setup, target = timed_call(case, dev)
    setup_args, _ = setup()
    target(*setup_args)  # warm-up: Triton compiles, allocators settle
    rounds = rounds_cuda if dev == "cuda" else rounds_cpu
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1)
    benchmark.extra_info.update(
        loss=case.loss, provider=case.provider, mode=case.mode, n=case.n, d=case.d,
        dtype=str(dtype_for(dev)), device=dev, **environment(),
    )
    if case.mode == "fwd+bwd":
        if dev == "cuda":
            benchmark.extra_info["peak_extra_bytes"] = cuda_peak_bytes(case)
            benchmark.extra_info["peak_method"] = "torch.cuda.max_memory_allocated minus inputs"
        else:
            peak = cpu_peak_bytes(case)
            benchmark.extra_info["peak_extra_bytes"] = peak["peak_extra_bytes"]
            benchmark.extra_info["peak_exact"] = peak["exact"]
            benchmark.extra_info["peak_method"] = "fresh process: ru_maxrss minus RSS after inputs"


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child_main(spec: str) -> None:
    import time

    cfg = json.loads(spec)
    inputs = make_inputs(cfg["loss"], cfg["n"], cfg["d"], "cpu", torch.float32)
    fn = loss_fn(cfg["loss"], cfg["provider"])
    scale = torch.tensor(SCALE, requires_grad=True)
    # ru_maxrss is useless here: Linux carries the parent's high-water mark through fork and
    # exec. VmHWM belongs to this process's address space, and writing 5 to clear_refs resets
    # it to the current RSS (Linux >= 4.0), so afterwards it is the peak of the call alone.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        exact = True
    except OSError:
        exact = False  # then VmHWM may include input construction: an upper bound
    before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    fn(inputs, scale).backward()
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    print(json.dumps(dict(peak_extra_bytes=peak - before, exact=exact, rss_before=before, seconds=seconds)))


if __name__ == "__main__":
    _child_main(sys.argv[1])
