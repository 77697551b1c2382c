"""The model's first and last layers, found from its data flow: what msModelSlim keeps float
by default (empty `QuantConfig.disable_names`) and what `quantize_first_last="8bit"` keeps at
8 bits.

One forward of the probe batch with autograd on records, for every quantizable layer, the
autograd nodes of its output and of its inputs; walking that graph gives

- **first**: the layers whose inputs depend on no quantizable layer's output. They read the
  model's inputs through float operations alone (embeddings, norms, reshapes): a CNN's stem,
  the query, key and value projections of a transformer's first block (they read one
  tensor), the first layer of each input branch.
- **last**: the layers whose output reaches a model output through no other quantizable
  layer and that no quantizable layer reads: each head of a multi-head model. A residual
  network's blocks write into a stream that reaches the output through adds and norms only;
  their writers feed the next block's layers, so they are not last (a transformer's
  attention and MLP output projections).

Module order says nothing about either: a model may define its head before its stem. It
stands in only where the graph cannot tell — the forward builds no graph (it runs under
`no_grad`, or no weight requires grad), or part of it (then "first" is the first layer
defined) — and a graph in which no layer is last falls back to the layers reaching an output.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from bridge.capture.tensors import tensors_in


class Ends(NamedTuple):
    """Layer names, each list in module order; `by_data_flow` False where module order stood in."""

    first: list[str]
    last: list[str]
    by_data_flow: bool = True

    def why(self, name: str) -> str:
        """Why `name` is an end layer, for `Calibrator.summary()`."""
        if not self.by_data_flow:
            return "first or last layer in module order (the forward built no autograd graph)"
        reasons = ["first layer: reads a model input through no quantizable layer"] if name in self.first else []
        reasons += ["last layer: no quantizable layer reads its output"] if name in self.last else []
        return "; ".join(reasons)


class EndsRecorder:
    """Hooks that record, in one forward with autograd on, the autograd nodes of every
    layer's output and inputs; `ends(out)` walks them (module docstring)."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.names = list(layers)
        self.produced, self.inputs, self.ungraphed = {}, {}, []
        self.handles = [m.register_forward_hook(self._record(n)) for n, m in layers.items()]
        self.handles += [m.register_forward_pre_hook(self._read(n), with_kwargs=True) for n, m in layers.items()]

    def _record(self, name):
        def hook(_m, _a, out):
            nodes = [t.grad_fn for t in tensors_in(out) if t.grad_fn is not None]
            self.produced.update(dict.fromkeys(nodes, name))
            if not nodes:
                self.ungraphed.append(name)

        return hook

    def _read(self, name):
        def hook(_m, args, kwargs):
            nodes = [t.grad_fn for t in tensors_in((args, kwargs)) if t.grad_fn is not None]
            self.inputs.setdefault(name, []).extend(nodes)

        return hook

    def ends(self, out) -> Ends:
        """The first and last layers, given the model's output `out` of the recorded forward."""
        names, produced = self.names, self.produced
        if not produced:
            return Ends(names[:1], names[-1:], by_data_flow=False)
        reaching_output = _producers_reached(produced, [t.grad_fn for t in tensors_in(out) if t.grad_fn is not None])
        read_by_a_layer = _producers_reached(produced, [n for nodes in self.inputs.values() for n in nodes])
        last = (reaching_output - read_by_a_layer) or reaching_output
        if self.ungraphed:  # part of the forward ran without a graph: module order for the first layer
            first = set(names[:1])
        else:
            memo: dict = {}
            first = {n for n, nodes in self.inputs.items() if not any(_after_a_layer(s, produced, memo) for s in nodes)}
        return Ends([n for n in names if n in first], [n for n in names if n in last] or names[-1:])


def _producers_reached(produced: dict, starts: list) -> set[str]:
    """Names of the layers whose output nodes the autograd walk from `starts` meets before
    any other layer's output node."""
    found, seen, stack = set(), set(), list(starts)
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        if fn in produced:
            found.add(produced[fn])
        else:
            stack.extend(f for f, _ in fn.next_functions if f is not None)
    return found


def _after_a_layer(start, produced: dict, memo: dict) -> bool:
    """Whether the autograd node `start` depends on some layer's output node (`memo` is
    shared across calls: each node is visited once per forward)."""
    stack = [start]
    while stack:
        node = stack[-1]
        if node in memo:
            stack.pop()
            continue
        if node in produced:
            memo[node] = True
            stack.pop()
            continue
        kids = [f for f, _ in node.next_functions if f is not None]
        todo = [k for k in kids if k not in memo]
        if todo:
            stack.extend(todo)
            continue
        memo[node] = any(memo[k] for k in kids)
        stack.pop()
    return memo[start]
