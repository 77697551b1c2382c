"""Lowerings jaxq gives torchax in place of its own, each for a measured reason.

- Depthwise 2-D convolution (`groups == in_channels`, one input channel per filter, no
  dilation) as a sum of `k·k` shifted, per-channel-scaled slices of the padded input.
  XLA's CPU backend runs grouped convolutions several times slower than torch, which
  made EfficientNet-style models slower in JAX than in torch (`benchmarks/README.md`).
  Only the summation order differs from a convolution (float rounding, ~1e-6). Its
  backward pass is written out (`_depthwise_bwd`): differentiating the strided slices
  left `k·k` padded copies of the input for a later fusion to add up, which made one
  step of block reconstruction several times slower than its forward.
- Pointwise 2-D convolution (1×1 kernel, no padding, one group) as an `einsum` over
  channels: faster than XLA CPU's convolution, unbatched and under `vmap` with
  per-variant weights.

Other convolutions keep torchax's lowering.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _pairs(v, n: int) -> tuple:
    v = tuple(v)
    return v * n if len(v) == 1 else v


def is_depthwise(x_shape, w_shape, groups, dilation, transposed) -> bool:
    return (
        not transposed
        and len(w_shape) == 4
        and len(x_shape) == 4
        and w_shape[1] == 1
        and groups == x_shape[1] == w_shape[0]
        and all(d == 1 for d in _pairs(dilation, 2))
    )


def _window(xp, i: int, j: int, stride, out_hw):
    """`xp[:, :, i + s_h·h, j + s_w·w]` over the output positions `h, w` (tap `i, j`)."""
    (sh, sw), (ho, wo) = stride, out_hw
    return jax.lax.slice(
        xp, (0, 0, i, j), (xp.shape[0], xp.shape[1], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1), (1, 1, sh, sw)
    )


def _shifted_sum(xp, w, stride, out_hw):
    """`Σ_{i,j} _window(xp, i, j) · w[:, 0, i, j]` over the taps (NCHW, `xp` padded)."""
    out = None
    for i in range(w.shape[2]):
        for j in range(w.shape[3]):
            term = _window(xp, i, j, stride, out_hw) * w[:, 0, i, j][None, :, None, None]
            out = term if out is None else out + term
    return out


def _padded(x, padding):
    (ph, pw) = padding
    return jnp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def _out_hw(xp_shape, w_shape, stride) -> tuple[int, int]:
    return tuple((xp_shape[2 + a] - w_shape[2 + a]) // stride[a] + 1 for a in range(2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, w, stride, padding):
    xp = _padded(x, padding)
    return _shifted_sum(xp, w, stride, _out_hw(xp.shape, w.shape, stride))


def _depthwise_fwd(x, w, stride, padding):
    return _depthwise(x, w, stride, padding), (x, w)


def _depthwise_bwd(stride, padding, residuals, g):
    """`∂x`: `g` spread back by the stride (zeros between), padded by the kernel, and
    correlated with the flipped kernel — one fused sum, where differentiating the forward's
    strided slices gives `k·k` padded copies of the input's size that a later fusion then
    has to add up; `∂w`: one reduction of `window · g` per tap."""
    x, w = residuals
    (sh, sw), (ph, pw) = stride, padding
    kh, kw = w.shape[2], w.shape[3]
    xp = _padded(x, padding)
    ho, wo = g.shape[2], g.shape[3]
    taps = [jnp.sum(_window(xp, i, j, stride, (ho, wo)) * g, axis=(0, 2, 3)) for i in range(kh) for j in range(kw)]
    dw = jnp.stack(taps, axis=1).reshape(w.shape).astype(w.dtype)
    unused_h = xp.shape[2] - ((ho - 1) * sh + kh)  # rows of the padded input no window reads
    unused_w = xp.shape[3] - ((wo - 1) * sw + kw)
    spread = jax.lax.pad(
        g,
        jnp.zeros((), g.dtype),
        ((0, 0, 0), (0, 0, 0), (kh - 1, kh - 1 + unused_h, sh - 1), (kw - 1, kw - 1 + unused_w, sw - 1)),
    )
    dxp = _shifted_sum(spread, w[:, :, ::-1, ::-1], (1, 1), xp.shape[2:])
    return dxp[:, :, ph : ph + x.shape[2], pw : pw + x.shape[3]].astype(x.dtype), dw


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv2d(x, w, stride, padding):
    """`conv2d(x, w, groups=C)` for `w: [C, 1, kh, kw]` as a shifted sum (NCHW), with its
    own backward pass (`_depthwise_bwd`)."""
    return _depthwise(x, w, tuple(_pairs(stride, 2)), tuple(_pairs(padding, 2)))


def is_pointwise(x_shape, w_shape, groups, padding, dilation, transposed) -> bool:
    return (
        not transposed
        and len(w_shape) == 4
        and len(x_shape) == 4
        and tuple(w_shape[2:]) == (1, 1)
        and groups == 1
        and all(p == 0 for p in _pairs(padding, 2))
        and all(d == 1 for d in _pairs(dilation, 2))
    )


def pointwise_conv2d(x, w, stride):
    """`conv2d(x, w)` for `w: [O, C, 1, 1]`, no padding, as a channel contraction (NCHW)."""
    sh, sw = _pairs(stride, 2)
    if (sh, sw) != (1, 1):
        x = x[:, :, ::sh, ::sw]
    return jnp.einsum("nchw,oc->nohw", x, w[:, :, 0, 0])


def install(env) -> None:
    """Route torchax's `aten.convolution` / `aten.conv2d` through these lowerings where they apply."""
    import torch
    from torchax.ops import jaten, ops_registry

    original = jaten._aten_convolution

    def convolution(input, weight, bias, stride, padding, dilation, transposed=False, output_padding=0, groups=1):
        if isinstance(padding, str):
            return original(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        if is_depthwise(input.shape, weight.shape, groups, dilation, transposed):
            out = depthwise_conv2d(input, weight, stride, padding)
        elif is_pointwise(input.shape, weight.shape, groups, padding, dilation, transposed):
            out = pointwise_conv2d(input, weight, stride)
        else:
            return original(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        return out if bias is None else out + bias.reshape(1, -1, 1, 1)

    def conv2d(input, weight, bias=None, stride=(1,), padding=(0,), dilation=(1,), groups=1):
        return convolution(input, weight, bias, stride, padding, dilation, False, (0,), groups)

    for op, impl in ((torch.ops.aten.convolution, convolution), (torch.ops.aten.conv2d, conv2d)):
        for key in (op, op.default):
            env._ops[key] = ops_registry.Operator(
                key, impl, is_jax_function=True, is_user_defined=True, needs_env=False, is_view_op=False
            )
