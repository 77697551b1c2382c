"""The calibration pipeline, stated once: `plan(cfg)` is the ordered list of steps a
`QuantConfig` asks for (NNCF's `create_ptq_pipeline`). `bridge.pipeline` runs it.

    smooth_quant      migrate activation range into weights (SmoothQuant)     reads activations
    activations       activation quantizers from the observers                reads activations
    weights           weight quantizers: round to nearest, or ADMM scales     reads weights
    easy_quant        activation and weight scale search                      reads rows
    round_opt         SQuant data-free rounding                               reads weights
    adaround          learned rounding per layer                              reads rows
    gptq              column-by-column rounding with error feedback           reads rows
    blocks            BRECQ / QDrop rounding and step sizes per block         reads block inputs/outputs
    bias_correction   δ = (W − Ŵ)·E[row], after the last step that changes Ŵ  reads mean rows
    pd_quant          input step sizes learned on the model's output (PD-Quant) reads outputs
    fallback          the `amp_num` most sensitive layers back to float       reads outputs

What a step reads tells the runner what to capture, and one pass serves every step that
reads the same thing: bias correction's mean rows are summed in the activations' forwards,
or in the row steps' sampling pass when there is one. What a step reads: `activations` (observer states of each
layer's input), `weights` (the float weights), `rows` (sampled input rows of each layer,
`jaxq.rows`, with their float-model targets), `mean_rows` (each layer's mean input row over
all calibration data), `block_io` (each block's inputs and float outputs), `outputs` (the
model's outputs). Adding an algorithm is one entry here and one runner in `bridge.pipeline`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from jaxq.easyquant import ROWS_USED

READS = ("activations", "weights", "rows", "mean_rows", "block_io", "outputs")
WEIGHT_STEPS = ("weights", "easy_quant", "round_opt", "adaround", "gptq", "blocks")  # steps that change Ŵ


class Step(NamedTuple):
    """One step of the pipeline: its name, what it reads, its settings (a `jaxq.keep_acc`
    record, or the config value it acts on)."""

    name: str
    reads: tuple[str, ...]
    settings: Any = None

    def __str__(self) -> str:
        settings = "" if self.settings is None else f" {self.settings}"
        return f"{self.name:<16} reads {', '.join(self.reads)}{settings}"


def plan(cfg) -> tuple[Step, ...]:
    """The steps `cfg` (a resolved `QuantConfig`: `bias_correction` decided) asks for, in order."""
    ka = cfg.keep_acc
    steps = []
    if cfg.smooth_quant:
        steps.append(Step("smooth_quant", ("activations",), cfg.smooth_quant))
    rows_steps = [n for n in ("easy_quant", "adaround", "gptq") if getattr(ka, n) is not None]
    if cfg.act_quant:  # bias correction's mean rows come from the row steps' pass, else from this one
        mean_rows = ("mean_rows",) if cfg.bias_correction and not rows_steps else ()
        steps.append(Step("activations", ("activations", *mean_rows), cfg.act_method))
    steps.append(Step("weights", ("weights",), ka.admm))
    for name, reads in (("easy_quant", "rows"), ("round_opt", "weights"), ("gptq", "rows"), ("adaround", "rows")):
        if getattr(ka, name) is not None:
            settings = getattr(ka, name)
            if name == "adaround" and ka.gptq is not None:  # AdaRound refines GPTQ's codes
                settings = settings._replace(from_codes=True)
            steps.append(Step(name, (reads,), settings))
    if ka.blocks is not None:  # after GPTQ or AdaRound, blocks refine their codes
        from_codes = ka.gptq is not None or ka.adaround is not None
        steps.append(Step("blocks", ("block_io",), ka.blocks._replace(from_codes=from_codes)))
    if cfg.bias_correction:
        steps.append(Step("bias_correction", ("mean_rows",)))
    if ka.pd_quant is not None:  # the step sizes fitted to the final weights and bias correction
        steps.append(Step("pd_quant", ("outputs",), ka.pd_quant))
    if cfg.amp_num:
        steps.append(Step("fallback", ("outputs",), cfg.amp_num))
    return tuple(steps)


def describe(steps) -> str:
    """The plan as lines, one per step."""
    return "\n".join(str(s) for s in steps)


# of the rows sampled per layer, how many a row step reads (the first ones); others read all
ROWS_READ = {"easy_quant": ROWS_USED}


def rows_read(chain, sampled: int) -> int:
    """How many of a layer's `sampled` rows (the first, in sampled order) the row steps of
    `chain` read: the runner keeps no more than that once they are sampled."""
    return max((min(sampled, ROWS_READ.get(s.name, sampled)) for s in chain if "rows" in s.reads), default=0)


def layer_local(step: Step) -> bool:
    """A step that works on each layer alone from its rows or weights: the runner can run a
    chain of them layer group by layer group on one sampling of the rows."""
    return step.name != "weights" and set(step.reads) <= {"rows", "weights"}


__all__ = ["READS", "Step", "WEIGHT_STEPS", "describe", "layer_local", "plan"]
