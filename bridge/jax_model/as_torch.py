"""`AsTorch(qf)`: the JAX quantized forward behind a torch module's call, so evaluation
code written for torch models (the protocols of `bridge.evaluation`) scores it as is.
Inputs go to JAX, outputs come back as CPU tensors (dict outputs also by attribute)."""

from __future__ import annotations

import jax
import numpy as np
import torch
from torch import nn

from bridge.jax_model.lower import to_jax_tree
from bridge.jax_model.quantized import QuantizedForward


class Outputs(dict):
    """A dict of output tensors that also answers `out.last_hidden_state`."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e


def _to_torch(tree):
    if isinstance(tree, dict):
        return Outputs({k: _to_torch(v) for k, v in tree.items()})
    if isinstance(tree, (tuple, list)):
        return type(tree)(_to_torch(v) for v in tree)
    return torch.from_numpy(np.array(tree))


class AsTorch(nn.Module):
    def __init__(self, qf: QuantizedForward, switches=None):
        super().__init__()
        self.qf, self.switches = qf, switches if switches is not None else qf.default_switches()
        self._fn = jax.jit(qf.fn)

    def forward(self, *args, **kwargs):
        lw = self.qf.lowered
        out = self._fn(lw.params, lw.buffers, self.qf.state, self.switches, to_jax_tree(args), to_jax_tree(kwargs))
        return _to_torch(out)
