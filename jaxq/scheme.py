"""`QScheme`: the static description of one quantizer.

A scheme fixes the integer grid and how a real range maps onto it:

    signed b-bit:    qmin = −2^(b−1),  qmax = 2^(b−1) − 1
    unsigned b-bit:  qmin = 0,         qmax = 2^b − 1

`axis=None` is per-tensor; `axis=0` gives every slice along axis 0 (an output channel
of a Conv/Linear weight) its own scale and offset.
"""

from __future__ import annotations

import dataclasses

ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


@dataclasses.dataclass(frozen=True)
class QScheme:
    """Integer grid and symmetry of one quantizer (hashable, usable as a static arg)."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    axis: int | None = None

    def __post_init__(self):
        if self.bits not in ALLOWED_BITS:
            raise ValueError(f"QScheme.bits={self.bits!r} is not supported; allowed: {ALLOWED_BITS}")
        if self.axis is not None and not isinstance(self.axis, int):
            raise TypeError(f"QScheme.axis={self.axis!r} must be None (per-tensor) or an int")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def with_axis(self, axis: int | None) -> "QScheme":
        """The same grid quantizing along `axis` (None: per tensor)."""
        return dataclasses.replace(self, axis=axis)

    def describe(self) -> dict:
        """Plain-data description (for JSON export)."""
        return {
            "bits": self.bits,
            "signed": self.signed,
            "symmetric": self.symmetric,
            "axis": self.axis,
            "qmin": self.qmin,
            "qmax": self.qmax,
        }
