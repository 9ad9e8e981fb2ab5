"""Test tiers for the Triton kernels (see /work/shared/STYLE.md rule 8).

Without CUDA the Triton tests run the real kernels in Triton's CPU interpreter. The interpreter
is chosen when `@triton.jit` decorates a kernel, i.e. when `cliperase.kernels._triton_contrastive`
is first imported (lazily, on the first impl="triton" call), so the variable must be set before
any test runs: here. A subprocess per test would avoid touching the session's environment but
costs a torch import (seconds) per test on a 2-core CI machine. With CUDA nothing is set, and the
same tests compile the kernels for the GPU.
"""
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The embedded demo's cache (data and a 500-step pretraining) goes to a folder of the session,
# never the checkout's .cache: a test that prepares the demo by accident pays for it visibly here
# instead of writing into the working tree. Tests that want the demo build it where they say.
os.environ["CLIPERASE_CACHE"] = tempfile.mkdtemp(prefix="cliperase-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["CLIPERASE_CACHE"], ignore_errors=True)
