"""Host-side helpers of the kernel launchers."""

import triton

from kimi_hf.kernels._grid import cdiv, next_power_of_2


def test_grid_helpers_equal_tritons():
    """The plain-Python grid helpers give Triton's values (they replace its constexpr functions on the host)."""
    for n in range(0, 4100):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 64, 128):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
