"""`LayerSpec` and `apply`: a quantizable layer as a pure JAX function.

    linear:  y = x · Wᵀ + b                       x: [..., in],  W: [out, in]
    convNd:  y = conv(x, W; stride, padding, dilation, groups) + b
             x: [N, C_in, *spatial],  W: [C_out, C_in/groups, *kernel]

Layouts follow PyTorch (NCH / NCHW, OIH / OIHW) so captured tensors need no transposes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

KINDS = ("linear", "conv1d", "conv2d")
_SPATIAL = {"conv1d": 1, "conv2d": 2}


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Static description of one quantizable layer (hashable).

    `padding` holds one `(low, high)` pair per spatial dimension; `kernel` is the kernel
    size (needed by `jaxq.rows`, not by `apply`, which reads it from the weight).
    """

    name: str
    kind: str
    stride: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    has_bias: bool = False
    kernel: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"LayerSpec.kind={self.kind!r} is not supported; allowed: {KINDS}")
        n = _SPATIAL.get(self.kind, 0)
        for field in ("stride", "padding", "dilation"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"LayerSpec.{field}={getattr(self, field)!r} needs {n} entries for kind {self.kind!r}")
        if self.kernel and len(self.kernel) != n:
            raise ValueError(f"LayerSpec.kernel={self.kernel!r} needs {n} entries for kind {self.kind!r}")
        if self.groups < 1:
            raise ValueError(f"LayerSpec.groups={self.groups!r} must be ≥ 1")


def apply(spec: LayerSpec, w: jax.Array, b: jax.Array | None, x: jax.Array) -> jax.Array:
    """Evaluate the layer `spec` with weight `w`, bias `b` (or None) on input `x`."""
    if spec.kind == "linear":
        y = jnp.matmul(x, jnp.swapaxes(w, -1, -2), precision=lax.Precision.HIGHEST)
        return y if b is None else y + b
    n = _SPATIAL[spec.kind]
    spatial = "HW"[:n] if n == 2 else "H"
    dims = ("NC" + spatial, "OI" + spatial, "NC" + spatial)
    y = lax.conv_general_dilated(
        x,
        w,
        window_strides=spec.stride,
        padding=spec.padding,
        rhs_dilation=spec.dilation,
        dimension_numbers=dims,
        feature_group_count=spec.groups,
        precision=lax.Precision.HIGHEST,
    )
    if b is not None:
        y = y + jnp.reshape(b, (1, -1) + (1,) * n)
    return y
