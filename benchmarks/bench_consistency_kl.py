"""Benchmarks of consistency_kl: naive torch, chunked, Triton (no peer implements this loss)."""
import pytest

from benchmarks._registry import cases, run_case


@pytest.mark.parametrize("case", cases("consistency_kl"), ids=lambda c: c.id)
def test_consistency_kl(benchmark, case):
    run_case(benchmark, case)
