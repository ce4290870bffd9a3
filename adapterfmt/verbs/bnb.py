"""Baking into a checkpoint held in bitsandbytes' formats: dequantise, add ``dW``, re-quantise, report the error.

bitsandbytes (and transformers' ``load_in_4bit`` / ``load_in_8bit`` ``save_pretrained``) stores a module ``P``

- in 4 bits (``Linear4bit``, nf4 or fp4) as ``P.weight`` (packed codes, uint8) with its quantisation state
  ``P.weight.absmax``, ``P.weight.quant_map``, ``P.weight.nested_absmax`` and ``P.weight.nested_quant_map`` (when
  the block scales are themselves quantised) and ``P.weight.quant_state.bitsandbytes__<nf4|fp4>`` (JSON bytes);
- in 8 bits (``Linear8bitLt``) as ``P.weight`` (int8 row codes), ``P.SCB`` (each row's absmax) and
  ``P.weight_format``.

A bake dequantises such a weight with bitsandbytes' own functions, adds the adapters' merged ``dW`` in float32,
re-quantises it with bitsandbytes' quantiser and the module's own settings (block size, nf4 / fp4, nested
scales; 8 bits: through float16, as ``Int8Params`` does) and writes the new codes and state under the same
names. Re-quantisation is lossy: :func:`requantize_module` reports, per module, the largest absolute error of
the written weight against ``W + dW`` and that error's Frobenius norm relative to ``dW``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..deltas.modules import bnb_dequantize_4bit
from ..errors import UnsupportedError
from ..format.safetensors_io import Header, read_tensor

STATE_4BIT = ".weight.quant_state.bitsandbytes__"


@dataclass(frozen=True)
class BnbWeight:
    """The checkpoint tensors of one module's bitsandbytes weight."""

    path: str
    bits: int
    """4 or 8."""
    names: tuple[str, ...]
    """The weight's tensors: the codes first, then its quantisation state."""


def bnb_weights(where: Mapping[str, Header]) -> dict[str, BnbWeight]:
    """Module path -> its bitsandbytes weight, for every module of the checkpoint stored so."""
    found: dict[str, BnbWeight] = {}
    for name in where:
        if STATE_4BIT in name and name.rsplit("__", 1)[-1] in ("nf4", "fp4"):
            path = name[: name.index(STATE_4BIT)]
            state = sorted(n for n in (f"{path}.weight.{k}" for k in ("absmax", "quant_map", "nested_absmax",
                                                                      "nested_quant_map")) if n in where)
            found[path] = BnbWeight(path, 4, (f"{path}.weight", *state, name))
        elif name.endswith(".SCB") and where[name].tensors[name].dtype == "F32":
            path = name[: -len(".SCB")]
            weight = f"{path}.weight"
            if weight in where and where[weight].tensors[weight].dtype == "I8":
                fmt = [f"{path}.weight_format"] if f"{path}.weight_format" in where else []
                found[path] = BnbWeight(path, 8, (weight, name, *fmt))
    return found


def requantize_module(q: BnbWeight, where: Mapping[str, Header], add: Callable[[torch.Tensor], None]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The new tensors of ``q`` after ``add(w)`` adds ``dW`` in place to its dequantised float32 weight
    ``[out, in]``, and the error report ``{"bits", "quant_type", "max_abs_error", "relative_error"}``."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise UnsupportedError(f"module {q.path!r} is stored in bitsandbytes' {q.bits}-bit format; baking into it "
                               "needs bitsandbytes (pip install bitsandbytes)") from None
    t = {n: read_tensor(where[n], n) for n in q.names}
    weight = q.names[0]
    if q.bits == 4:
        state = bnbf.QuantState.from_dict({n[len(weight) + 1:]: v for n, v in t.items() if n != weight},
                                          torch.device("cpu"))
        base = bnb_dequantize_4bit(t[weight], state, f"module {q.path!r}").float()
        target = base.clone()
        add(target)
        codes, new_state = bnbf.quantize_4bit(target.to(state.dtype), blocksize=state.blocksize,
                                              compress_statistics=state.nested, quant_type=state.quant_type,
                                              quant_storage=t[weight].dtype)
        new = {weight: codes, **{f"{weight}.{k}": v for k, v in new_state.as_dict(packed=True).items()}}
        written = bnb_dequantize_4bit(codes, new_state, f"module {q.path!r}").float()
        quant_type = state.quant_type
    else:
        base = bnbf.int8_vectorwise_dequant(t[weight], t[q.names[1]]).float()
        target = base.clone()
        add(target)
        codes, scb, _ = bnbf.int8_vectorwise_quant(target.to(torch.float16))
        new = {**t, weight: codes, q.names[1]: scb}
        written = bnbf.int8_vectorwise_dequant(codes, scb).float()
        quant_type = "int8"
    if set(new) != set(t):
        raise UnsupportedError(f"module {q.path!r}: bitsandbytes re-quantised it with other state tensors "
                               f"({sorted(set(new) ^ set(t))}); the checkpoint's layout cannot be kept")
    err = written - target
    dw = (target - base).norm()
    report = {"bits": q.bits, "quant_type": quant_type, "max_abs_error": float(err.abs().max()),
              "relative_error": float(err.norm() / dw) if dw > 0 else 0.0}
    return new, report


__all__ = ["BnbWeight", "bnb_weights", "requantize_module"]
