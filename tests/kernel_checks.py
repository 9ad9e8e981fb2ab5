"""Helpers shared by the kernel tests: the numerical check, inputs, and the Triton tier.

The numerical check of /work/shared/STYLE.md rule 6: `ref(upcast=True)` is the truth; a fast
path passes when its error is at most twice the error of `ref` run in the low precision, plus a
small tolerance relative to the truth's magnitude.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, List, NamedTuple, Optional, Sequence

import pytest

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Result", "run_with_grads", "assert_fast_close", "embeddings", "RTOL", "needs_triton", "small_tiles",
           "SHAPES", "TRITON_SHAPES", "GPU_SHAPES", "CPU_DTYPES", "INTERPRETER_DTYPES", "SCALE",
           "LOSSES", "TRAINED", "loss_inputs", "loss_fn", "check_loss", "device_for_triton"]

# One shape registry for every kernel test.
# name: (n local rows, N global columns or None for single-process, d, row_offset)
SHAPES = {
    "tiny": (4, None, 8, 0),
    "odd": (37, None, 45, 0),
    "batch1": (1, None, 16, 0),
    "local_global": (12, 40, 24, 16),
    "local_global_first_rank": (13, 41, 37, 0),
    "local_global_last_rank": (13, 41, 37, 28),
    "local_batch1": (1, 9, 16, 4),
}
# Triton in the interpreter: N <= 48, d <= 40 keeps each case well under a second.
TRITON_SHAPES = ("tiny", "batch1", "local_global", "local_global_first_rank", "local_global_last_rank")
CPU_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INTERPRETER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # the interpreter computes bf16 wrongly
SCALE = 14.3  # a mid-training CLIP multiplier; large enough to make softmaxes peaky
# The GPU tier: ViT-H-14's embedding width, and the last of 4 ranks' rows against global columns.
GPU_SHAPES = {"production_vit_h14": (4096, None, 1024, 0), "local_rank3_of_4": (2048, 8192, 1024, 6144)}

# Tolerance relative to max|truth|, added to 2 x the low-precision reference's error.
RTOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# The magnitude below which an embedding gradient's tolerance stops shrinking. In fp32 the
# low-precision reference is the truth itself (its error is 0), so this alone sets the bar:
# gradients hold (p - onehot) * s / n, and a p formed in another order (base-2 logits, another
# LSE split) is off by ~ulp(S) ~ 1e-6 at |S| ~ 14, so the bar is RTOL * 0.1 = 2e-6 there.
# In fp16/bf16 the reference's own error dominates and 1e-3 keeps the bar tight.
GRAD_FLOOR = {torch.float32: 0.1, torch.float16: 1e-3, torch.bfloat16: 1e-3}


class Result(NamedTuple):
    values: List[Tensor]  # the loss outputs, fp32 0-dim
    grads: List[Tensor]  # gradients of the differentiable inputs, upcast to fp32
    scale_grad: Tensor  # gradient wrt logit_scale


def embeddings(rows: int, dim: int, dtype: torch.dtype, gen: torch.Generator, device="cpu") -> Tensor:
    """(rows, dim) L2-normalised Gaussian rows in `dtype`."""
    x = torch.randn(rows, dim, generator=gen)
    return F.normalize(x, dim=1).to(device=device, dtype=dtype)


def run_with_grads(fn: Callable, inputs: Sequence[Tensor], scale: float, *, seed: int = 0) -> Result:
    """Run `fn(*leaves, logit_scale)` and back-propagate a random upstream gradient.

    `fn` returns one 0-dim tensor or a tuple of them; each output gets its own random weight
    (seeded), so terms that are wrong in isolation cannot cancel.
    """
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    scale_t = torch.tensor(scale, dtype=torch.float32, device=inputs[0].device, requires_grad=True)
    out = fn(*leaves, scale_t)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(len(outs), generator=gen).to(inputs[0].device)
    sum(w * o for w, o in zip(weights, outs)).backward()
    return Result(
        [o.detach().float() for o in outs],
        [leaf.grad.float() for leaf in leaves],
        scale_t.grad.detach().clone(),
    )


def _flat(r: Result) -> List[Tensor]:
    return [*r.values, *r.grads, r.scale_grad]


def assert_fast_close(fast: Result, low: Result, truth: Result, dtype: torch.dtype, what: str = "") -> None:
    """Raise AssertionError naming the first output whose error breaks the rule above."""
    names = [f"value[{i}]" for i in range(len(truth.values))]
    names += [f"grad[{i}]" for i in range(len(truth.grads))] + ["grad[logit_scale]"]
    for name, f, lo, t in zip(names, _flat(fast), _flat(low), _flat(truth)):
        assert f.shape == t.shape, f"{what} {name}: shape {tuple(f.shape)} != {tuple(t.shape)}"
        assert torch.isfinite(f).all(), f"{what} {name}: non-finite values"
        err_fast = (f - t).abs().max().item()
        err_low = (lo - t).abs().max().item()
        # Losses are O(1) nats built from logits of size ~s: never ask for less than RTOL there.
        # d/ds sums n x N terms that largely cancel, and with the KL it carries each row's
        # KL (a difference of two LSEs of size ~s, so ~ulp(s) of noise in the truth as well).
        floor = 1.0 if name.startswith("value") else 0.1 if name == "grad[logit_scale]" else GRAD_FLOOR[dtype]
        tol = 2 * err_low + RTOL[dtype] * max(t.abs().max().item(), floor)
        assert err_fast <= tol, f"{what} {name}: error {err_fast:.3g} > {tol:.3g} (low-precision ref error {err_low:.3g})"


def _triton_skip_reason() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)"
    return None


needs_triton = pytest.mark.skipif(_triton_skip_reason() is not None, reason=str(_triton_skip_reason()))


@pytest.fixture
def small_tiles(monkeypatch):
    """Chunked tiles of 16 x 8 so that the small shapes span several, uneven tiles."""
    from cliperase.kernels import _contrastive

    monkeypatch.setattr(_contrastive, "DEFAULT_CHUNKED_CONFIG", _contrastive.ChunkedConfig(16, 8))


# The three public losses, by name, for tests that run all of them the same way.
LOSSES = ("clip_infonce", "consistency_kl", "cliperase_loss")
TRAINED = "trained"  # teacher_logit_scale: the student's own scale tensor (it gets both gradients)


def device_for_triton() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def loss_inputs(shape, dtype: torch.dtype, device="cpu", seed: int = 0):
    """Student leaves `[zi, zt]` or `[zi, zt, zi_all, zt_all]` and the teacher keyword arguments.

    The teacher is a perturbed copy of the student (as after a few unlearning steps), so the KL
    is well away from 0; in the local-vs-global layout the teacher dict carries `row_offset`.
    """
    n, big_n, d, off = shape
    gen = torch.Generator().manual_seed(seed)
    rows = big_n or n
    zi_all, zt_all = embeddings(rows, d, dtype, gen, device), embeddings(rows, d, dtype, gen, device)
    noise = [embeddings(rows, d, torch.float32, gen, device) for _ in range(2)]
    zi0_all = F.normalize(zi_all.float() + 0.3 * noise[0], dim=1).to(dtype)
    zt0_all = F.normalize(zt_all.float() + 0.3 * noise[1], dim=1).to(dtype)
    if big_n is None:
        return [zi_all, zt_all], dict(zi0=zi0_all, zt0=zt0_all)
    teacher = dict(zi0=zi0_all[off : off + n], zt0=zt0_all[off : off + n], zi0_all=zi0_all, zt0_all=zt0_all, row_offset=off)
    return [zi_all[off : off + n], zt_all[off : off + n], zi_all, zt_all], teacher


def loss_fn(name: str, impl: str, teacher: dict, **extra) -> Callable:
    """A closure over (zi, zt[, zi_all, zt_all], logit_scale) for `run_with_grads`.

    `impl`: "ref32" (the truth), "ref_low" (the reference in the input dtype) or a backend.
    `extra`: keyword arguments of the loss (`caption_ids`, `teacher_logit_scale`; TRAINED
    passes the scale leaf itself). clip_infonce ignores the teacher except its `row_offset`.
    """
    import cliperase.kernels as K

    def fn(*args):
        *z, s = args
        kw = dict(teacher)
        zi0, zt0 = kw.pop("zi0"), kw.pop("zt0")
        kw.update(extra)
        if len(z) == 4:
            kw.update(zi_all=z[2], zt_all=z[3])
        if isinstance(kw.get("teacher_logit_scale"), str) and kw["teacher_logit_scale"] == TRAINED:
            kw["teacher_logit_scale"] = s
        if name == "clip_infonce":
            kw = {k: v for k, v in kw.items() if k in ("zi_all", "zt_all", "row_offset", "caption_ids")}
            head = (z[0], z[1], s)
        else:
            head = (z[0], z[1], zi0, zt0, s)
        if impl in ("ref32", "ref_low"):
            return getattr(K, name + "_ref")(*head, upcast=impl == "ref32", **kw)
        return getattr(K, name)(*head, impl=impl, **kw)

    return fn


def check_loss(name: str, impl: str, shape, dtype: torch.dtype, device="cpu", **extra) -> Result:
    """Run `impl`, the fp32 truth and the low-precision reference on the same random inputs
    (random upstream gradient) and assert the rule above; returns the truth."""
    inputs, teacher = loss_inputs(shape, dtype, device=device)
    truth = run_with_grads(loss_fn(name, "ref32", teacher, **extra), inputs, SCALE)
    low = run_with_grads(loss_fn(name, "ref_low", teacher, **extra), inputs, SCALE)
    fast = run_with_grads(loss_fn(name, impl, teacher, **extra), inputs, SCALE)
    assert_fast_close(fast, low, truth, dtype, what=f"{name} {impl} {shape} {dtype}")
    return truth
