"""Benchmarks of clip_infonce: naive torch, open_clip ClipLoss, chunked, Triton, Inf-CL.

Also the CPU memory requirement: the chunked path's peak memory at N=16384 must be under a
tenth of the naive one, measured side by side (fresh processes, see `_registry`).
"""
import pytest

from benchmarks._registry import Case, cases, cpu_peak_bytes, device, environment, run_case

LOSS = "clip_infonce"


@pytest.mark.parametrize("case", cases(LOSS), ids=lambda c: c.id)
def test_clip_infonce(benchmark, case):
    run_case(benchmark, case)


MEMORY_N, MEMORY_D = 16384, 768


def test_chunked_memory_under_tenth_of_naive_n16384(benchmark):
    if device() != "cpu":
        pytest.skip("the CPU memory requirement; on CUDA the fwd+bwd cases record peak memory")
    peaks = {}

    def measure():
        for provider in ("naive", "chunked"):
            peaks[provider] = cpu_peak_bytes(Case(LOSS, provider, "fwd+bwd", MEMORY_N, MEMORY_D))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    ratio = peaks["chunked"]["peak_extra_bytes"] / peaks["naive"]["peak_extra_bytes"]
    benchmark.extra_info.update(
        loss=LOSS, n=MEMORY_N, d=MEMORY_D, dtype="torch.float32", device="cpu", mode="fwd+bwd",
        naive_peak_extra_bytes=peaks["naive"]["peak_extra_bytes"],
        chunked_peak_extra_bytes=peaks["chunked"]["peak_extra_bytes"],
        naive_seconds=peaks["naive"]["seconds"], chunked_seconds=peaks["chunked"]["seconds"],
        chunked_peak_exact=peaks["chunked"]["exact"], naive_peak_exact=peaks["naive"]["exact"],
        chunked_over_naive=ratio, **environment(),
    )
    assert peaks["naive"]["exact"] and peaks["chunked"]["exact"], "peak-RSS reset refused: numbers are upper bounds"
    assert ratio < 0.1, f"chunked/naive peak memory {ratio:.3f} at N={MEMORY_N}"
