"""What each input group's Linear layers see while one decoder layer runs on the
calibration inputs: `H = E[xxᵀ]` (GPTQ), `mean|x|` (AWQ), per-channel `max|x|` (static
activation scales) and a uniform sample of input rows (AWQ's error), all in float64 sums
over every token of every batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from bridge.llm.decoder import InputGroup


@dataclasses.dataclass
class InputStats:
    """Statistics of one group's input `[tokens, d]` (module docstring)."""

    h: np.ndarray  # [d, d] E[xxᵀ]
    mean_abs: np.ndarray  # [d]
    max_abs: np.ndarray  # [d]
    rows: np.ndarray  # [n, d] float32 sample
    tokens: int

    def scaled(self, s: np.ndarray) -> "InputStats":
        """The statistics of `x / s` (an AWQ or rotation scale folded into the producer)."""
        return InputStats(
            self.h / np.outer(s, s), self.mean_abs / s, self.max_abs / s, self.rows / s[None, :], self.tokens
        )


class _Accumulator:
    def __init__(self, d: int, keep_rows: int, generator: np.random.Generator):
        self.h = np.zeros((d, d), np.float64)
        self.abs_sum = np.zeros(d, np.float64)
        self.max_abs = np.zeros(d, np.float64)
        self.rows = np.zeros((0, d), np.float32)
        self.keys = np.zeros(0)
        self.tokens = 0
        self.keep_rows, self.rng = keep_rows, generator

    def __call__(self, _module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.h += (x.T @ x).double().numpy()  # float32 products of one batch, float64 sums over batches
        a = x.abs()
        self.abs_sum += a.sum(0, dtype=torch.float64).numpy()
        self.max_abs = np.maximum(self.max_abs, a.amax(0).double().numpy())
        self.tokens += x.shape[0]
        # bottom-k of a random key per row: a uniform sample of all rows in bounded memory;
        # only the new rows that make the cut are copied
        new_keys = self.rng.random(x.shape[0])
        keys = np.concatenate([self.keys, new_keys])
        keep = np.sort(np.argsort(keys, kind="stable")[: self.keep_rows])
        old, new = keep[keep < len(self.keys)], keep[keep >= len(self.keys)] - len(self.keys)
        self.rows = np.concatenate([self.rows[old], x[torch.from_numpy(new)].numpy()])
        self.keys = np.concatenate([self.keys[old], new_keys[new]])

    def result(self) -> InputStats:
        n = max(self.tokens, 1)
        return InputStats(self.h / n, self.abs_sum / n, self.max_abs, self.rows, self.tokens)


def capture_inputs(layer: nn.Module, groups: tuple[InputGroup, ...], run, keep_rows: int, seed: int) -> dict:
    """`{group.producer: InputStats}` gathered while `run()` feeds the layer its inputs."""
    accs, handles = {}, []
    try:
        for i, g in enumerate(groups):
            first = layer.get_submodule(g.linears[0])
            # a random stream per group: row i gets the same key whatever the batch size
            rng = np.random.default_rng([seed, i])
            accs[g.producer] = _Accumulator(first.in_features, keep_rows, rng)
            handles.append(first.register_forward_pre_hook(accs[g.producer]))
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return {k: a.result() for k, a in accs.items()}
