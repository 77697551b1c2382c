"""`KeepAcc`: which accuracy-keeping algorithms run, each with its own typed settings.

Each algorithm's settings are a small record, or `None` when it is off (qwix's habit: one
config per algorithm). msModelSlim's list form is accepted and written back:

    QuantConfig(keep_acc={"admm": [True, 1000], "easy_quant": [False, 1000], "round_opt": False})
    QuantConfig(keep_acc=KeepAcc(admm=Admm(iters=1000)))            # the same, typed

The order they run in is `jaxq.pipeline.plan`; what each does is docs/design.md §4.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import NamedTuple

MAX_ITERS = 100_000  # per layer: beyond this an algorithm runs for hours on one layer


class Admm(NamedTuple):
    """Per-channel weight-scale refinement (`jaxq.admm`), up to `iters` alternations."""

    iters: int = 1000


class EasyQuant(NamedTuple):
    """EasyQuant scale search (`jaxq.easyquant`), `candidates` grid points in [0.5·S, 2·S]."""

    candidates: int = 1000


class RoundOpt(NamedTuple):
    """SQuant data-free rounding (`jaxq.squant`)."""


class AdaRound(NamedTuple):
    """(jaxq extension) AdaRound learned rounding (`jaxq.adaround`), `steps` Adam steps per
    layer; `from_codes`: start from the current codes instead of the float weight (the
    pipeline sets it when GPTQ runs first, so AdaRound refines GPTQ's rounding)."""

    steps: int = 1000
    from_codes: bool = False


class Gptq(NamedTuple):
    """(jaxq extension) GPTQ (`jaxq.gptq`): columns quantized in order with the error fed
    back through the inverse Hessian of the layer's input rows.

    block_size: columns updated together (lazy batch updates); damp: fraction of the mean
    Hessian diagonal added to it; act_order: columns in order of decreasing Hessian diagonal.
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True


class Blocks(NamedTuple):
    """(jaxq extension, needs the `jax` extra) block reconstruction: every weight's rounding
    in a block and its input step sizes learned on the block's output, `steps` Adam steps
    per block; activation quantization kept with probability `keep` (1 = BRECQ, ½ = QDrop);
    `from_codes`: the rounding starts from the current codes (the pipeline sets it when
    GPTQ or AdaRound runs first) instead of the float weight."""

    steps: int = 300
    keep: float = 1.0
    from_codes: bool = False


class PdQuant(NamedTuple):
    """(jaxq extension, needs the `jax` extra) every quantized input's step size learned on
    the whole model's output distance from float (PD-Quant's prediction difference,
    `jaxq.pd_quant`): `steps` Adam steps on mini-batches of `batch` calibration samples,
    learning rate `lr` on the log of each step size's change."""

    steps: int = 200
    batch: int = 8
    lr: float = 5e-3


LIST_FORM = ("admm", "easy_quant", "adaround", "brecq", "qdrop", "pd_quant")  # msModelSlim's [enabled, iterations]
DEFAULT_ITERS = {"admm": 1000, "easy_quant": 1000, "adaround": 1000, "brecq": 300, "qdrop": 300, "pd_quant": 200}


@dataclasses.dataclass(frozen=True)
class KeepAcc:
    """Accuracy-keeping algorithms (docs/design.md §4): each a settings record, or `None` (off).

    admm, easy_quant, round_opt: msModelSlim's; adaround, gptq, brecq, qdrop, pd_quant: jaxq's.
    `qdrop` takes precedence over `brecq` (`blocks`).
    """

    admm: Admm | None = None
    easy_quant: EasyQuant | None = None
    round_opt: RoundOpt | None = None
    adaround: AdaRound | None = None
    gptq: Gptq | None = None
    brecq: Blocks | None = None
    qdrop: Blocks | None = None
    pd_quant: PdQuant | None = None

    @classmethod
    def from_user(cls, value) -> "KeepAcc":
        """Accept `None`, a `KeepAcc`, or msModelSlim's dict; missing keys are off."""
        if value is None:
            return cls()
        if isinstance(value, KeepAcc):
            return value._checked()
        if not isinstance(value, dict):
            raise TypeError(
                f"QuantConfig.keep_acc={value!r} must be a dict like "
                "{'admm': [False, 1000], 'easy_quant': [False, 1000], 'round_opt': False}"
            )
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ValueError(f"QuantConfig.keep_acc has unknown key(s) {unknown}; allowed keys: {allowed}")
        kwargs = {}
        for key in LIST_FORM:
            if key in value:
                enabled, iters = _enabled_iters(key, value[key])
                kwargs[key] = _from_iters(key, iters) if enabled else None
        if "round_opt" in value:
            v = value["round_opt"]
            if isinstance(v, (list, tuple)) and len(v) == 1:
                v = v[0]
            kwargs["round_opt"] = RoundOpt() if check_bool("keep_acc['round_opt']", v) else None
        if "gptq" in value:
            kwargs["gptq"] = _gptq_from_user(value["gptq"])
        return cls(**kwargs)._checked()

    def _checked(self) -> "KeepAcc":
        for key, kind in (
            ("admm", Admm),
            ("easy_quant", EasyQuant),
            ("round_opt", RoundOpt),
            ("adaround", AdaRound),
            ("gptq", Gptq),
            ("brecq", Blocks),
            ("qdrop", Blocks),
            ("pd_quant", PdQuant),
        ):
            v = getattr(self, key)
            if v is not None and not isinstance(v, kind):
                raise TypeError(f"QuantConfig.keep_acc.{key}={v!r} must be a jaxq.keep_acc.{kind.__name__} or None")
        for key in LIST_FORM:
            v = getattr(self, key)
            if v is not None and not 1 <= v[0] <= MAX_ITERS:
                raise ValueError(
                    f"QuantConfig.keep_acc[{key!r}] iterations={v[0]} must be in [1, {MAX_ITERS}] per "
                    "layer (each is a pass over the layer's weights or rows: hours, or memory for a "
                    "candidate grid, beyond); the defaults are 1000"
                )
        if self.gptq is not None:
            _check_gptq(self.gptq)
        return self

    def as_dict(self) -> dict:
        """msModelSlim's list form (gptq as a dict of its settings)."""
        out = {
            key: [
                getattr(self, key) is not None,
                getattr(self, key)[0] if getattr(self, key) is not None else DEFAULT_ITERS[key],
            ]
            for key in LIST_FORM
        }
        out["round_opt"] = self.round_opt is not None
        if self.gptq is not None:
            out["gptq"] = self.gptq._asdict()
        return out

    @property
    def blocks(self) -> Blocks | None:
        """Block reconstruction's settings (QDrop over BRECQ), or None."""
        return self.qdrop if self.qdrop is not None else self.brecq

    @property
    def fits(self) -> bool:
        """Some step fits layers or blocks to the calibration data (reads `recon_*` data)."""
        return any(
            a is not None for a in (self.easy_quant, self.adaround, self.gptq, self.brecq, self.qdrop, self.pd_quant)
        )


def _from_iters(key: str, iters: int):
    if key == "admm":
        return Admm(iters)
    if key == "easy_quant":
        return EasyQuant(iters)
    if key == "adaround":
        return AdaRound(iters)
    if key == "pd_quant":
        return PdQuant(iters)
    return Blocks(iters, 0.5 if key == "qdrop" else 1.0)


def is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_bool(field: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"QuantConfig.{field}={value!r} must be a bool (True or False)")
    return value


def _enabled_iters(key: str, value) -> tuple[bool, int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if ok:
        enabled, iters = value
        ok = isinstance(enabled, bool) and is_int(iters) and iters >= 1
    if not ok:
        raise ValueError(f"QuantConfig.keep_acc[{key!r}]={value!r} must be [bool, iterations ≥ 1], e.g. [True, 1000]")
    return (bool(value[0]), int(value[1]))


def _gptq_from_user(value) -> Gptq | None:
    if isinstance(value, Gptq):
        return value
    if isinstance(value, bool):
        return Gptq() if value else None
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(Gptq._fields))
        if unknown:
            raise ValueError(
                f"QuantConfig.keep_acc['gptq'] has unknown key(s) {unknown}; allowed: {list(Gptq._fields)}"
            )
        return Gptq(**value)
    raise TypeError(
        f"QuantConfig.keep_acc['gptq']={value!r} must be True/False or a dict of "
        f"{list(Gptq._fields)}, e.g. {{'block_size': 128, 'damp': 0.01, 'act_order': True}}"
    )


def _check_gptq(g: Gptq) -> None:
    if not is_int(g.block_size) or g.block_size < 1:
        raise ValueError(f"QuantConfig.keep_acc['gptq'] block_size={g.block_size!r} must be an int ≥ 1 (128 usual)")
    if isinstance(g.damp, bool) or not isinstance(g.damp, numbers.Real) or not 0 < g.damp < 1:
        raise ValueError(f"QuantConfig.keep_acc['gptq'] damp={g.damp!r} must be a number in (0, 1) (0.01 usual)")
    check_bool("keep_acc['gptq'] act_order", g.act_order)
