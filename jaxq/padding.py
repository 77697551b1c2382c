"""How jaxq pads shapes so that few programs serve many sizes (one place for the rules).

bucket_size(n)          smallest 2^k·m/4 ≥ n, m ∈ {4, 5, 6, 7} (at least 8): ≤ 25 % padding;
                        weights and GPTQ problems, where padding costs work per element
power_of_two(n, least)  smallest power of two ≥ max(n, least); counts, token lengths and
                        buffers, where fewer distinct shapes matter more than padding
"""

from __future__ import annotations


def power_of_two(n: int, least: int = 1) -> int:
    """Smallest power of two ≥ `max(n, least)`."""
    return 1 << (max(int(n), int(least), 1) - 1).bit_length()


def bucket_size(n: int) -> int:
    """Smallest `2^k·m/4 ≥ n`, `m ∈ {4, 5, 6, 7}` (at least 8): ≤ 25 % padding per axis."""
    n = max(int(n), 8)
    power = power_of_two(n)
    quarter = power // 8
    return next(s for s in (5 * quarter, 6 * quarter, 7 * quarter, power) if s >= n)
