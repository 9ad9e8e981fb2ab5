"""CPU: the materialised reference against the chunked path of `cliperase_loss`, by batch size.

    .venv/bin/python -m pytest benchmarks/bench_loss_dispatch.py --benchmark-enable \\
        --benchmark-timer time.process_time --benchmark-json=benchmarks/results/cpu-loss-dispatch.json

What the CPU default (`kernels._common.resolve_impl`) should pick below the size where
materialising fits easily. fwd+bwd, fp32, d = 1024, `logit_scale = 100`, one torch thread (so that
process CPU time, the timer above, holds no OpenMP spin-wait of a shared machine); "naive" and
"chunked" alternate at each N so that both see the same load. N stops at 4096: the reference's
peak there is ~1 GB (results/cpu-kernels.json) and 4x that at 8192, more than this benchmark
may take on a shared 24 GB machine.
"""
import pytest
import torch

from benchmarks._registry import Case, cpu_peak_bytes, environment, timed_call

NS = (8, 64, 256, 1024, 2048, 4096)
D = 1024
PARAMS = [(n, provider) for n in NS for provider in ("naive", "chunked")]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("n,provider", PARAMS, ids=[f"{p}-N{n}" for n, p in PARAMS])
def test_cpu_dispatch(benchmark, one_thread, n, provider):
    case = Case("cliperase_loss", provider, "fwd+bwd", n, D)
    setup, target = timed_call(case, "cpu")
    setup_args, _ = setup()
    target(*setup_args)  # warm-up
    rounds = 3 if n >= 2048 else 10
    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1)
    benchmark.extra_info.update(loss=case.loss, provider=provider, mode=case.mode, n=n, d=D, dtype="float32",
                                device="cpu", **environment(), torch_threads_timed=1)
    if n >= 1024:
        peak = cpu_peak_bytes(case)
        benchmark.extra_info.update(peak_extra_bytes=peak["peak_extra_bytes"], peak_exact=peak["exact"])
