"""Padded step shapes (engine/shapes.py): the sizes a step's GEMMs may see on CUDA."""

from __future__ import annotations

import pytest

from vtensor.engine.shapes import padded_size, step_sizes


@pytest.mark.parametrize("budget", [1, 7, 100, 2048, 16384, 20000])
def test_step_sizes_bound_the_padding(budget):
    sizes = step_sizes(budget)
    assert sizes == sorted(set(sizes)) and sizes[-1] == budget and sizes[0] == 1
    assert all(s % 16 == 0 for s in sizes if 16 <= s < budget)  # aligned rows above 16
    for n in range(1, budget + 1, max(1, budget // 997)):
        p = padded_size(sizes, n)
        assert p in sizes and p >= n
        if n > 256:
            assert p - n <= n / 16  # <= 6.25% extra rows where GEMMs cost
    assert padded_size(sizes, budget + 5) == budget + 5  # past the largest: unpadded


def test_step_sizes_count():
    assert len(step_sizes(16384)) == 116  # the startup runs each GEMM shape at each size
