"""Benchmarks of cliperase_loss (InfoNCE + KL together): naive torch, chunked, Triton.

The fused backends share the student tiles between the two terms; naive computes both
references, each with its own logits.
"""
import pytest

from benchmarks._registry import cases, run_case


@pytest.mark.parametrize("case", cases("cliperase_loss"), ids=lambda c: c.id)
def test_cliperase_loss(benchmark, case):
    run_case(benchmark, case)
