"""How a delta reaches a torch module: the module's function with a given weight, and its layout.

Delta kinds are defined on the *function layout* of a layer: a weight of shape ``[out, in, ...]`` as in
``nn.Linear`` / ``nn.Conv2d``. Layers that store their weight the other way round (GPT-2's ``Conv1D``,
``nn.Embedding`` viewed as a map from one-hot rows) are "transposed"; this module knows which is which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError

if TYPE_CHECKING:
    import torch
    from torch import nn


def is_transposed(module: nn.Module) -> bool:
    """True when the module stores its weight as ``[in, out]`` (Conv1D, Embedding)."""
    from torch import nn

    return isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D"


def weight_function(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The module's forward with ``weight`` (function layout) in place of its own, and no bias."""
    import torch.nn.functional as F
    from torch import nn

    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D" or held_quantized(module):
        return F.linear(x, weight)
    if isinstance(module, nn.Embedding):
        return F.embedding(x, weight.t(), module.padding_idx, module.max_norm, module.norm_type,
                           module.scale_grad_by_freq, module.sparse)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise UnsupportedError(f"Conv2d with padding_mode={module.padding_mode!r} is not supported")
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, nn.Conv1d):
        return F.conv1d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    raise UnsupportedError(f"cannot apply a weight delta to a module of type {type(module).__name__}")


def held_quantized(module: nn.Module) -> bool:
    """Whether the module holds its weight quantised, so that ``module.weight`` is not the weight: a
    bitsandbytes ``Linear4bit`` (nf4 / fp4) or ``Linear8bitLt`` holding int8 codes, or a module with a
    ``dequantized()`` method (adapterfmt's ``QuantizedLinear``)."""
    if callable(getattr(module, "dequantized", None)):
        return True
    if not type(module).__module__.startswith("bitsandbytes."):
        return False
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None or int8_scales(module) is not None


def int8_scales(module: nn.Module) -> torch.Tensor | None:
    """A bitsandbytes 8-bit module's row scales (``SCB``): on its weight, or, after its first training-mode
    forward (``init_8bit_state``), on ``module.state``."""
    scb = getattr(getattr(module, "weight", None), "SCB", None)
    return scb if scb is not None else getattr(getattr(module, "state", None), "SCB", None)


def function_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight in function layout. A module that :func:`held_quantized` gives a new tensor, its
    own dequantisation (bitsandbytes' ``dequantize_4bit`` / ``int8_vectorwise_dequant``, a ``dequantized()``)."""
    if callable(getattr(module, "dequantized", None)):
        return module.dequantized()
    w = module.weight
    if held_quantized(module):
        if getattr(w, "quant_state", None) is not None:
            return bnb_dequantize_4bit(w.data, w.quant_state, f"this {type(module).__name__}")
        import bitsandbytes.functional as bnbf

        return bnbf.int8_vectorwise_dequant(w.data, int8_scales(module))
    return w.t() if is_transposed(module) else w


def bnb_dequantize_4bit(codes: torch.Tensor, state: Any, what: str) -> torch.Tensor:
    """bitsandbytes' ``dequantize_4bit`` of packed ``codes`` with their ``QuantState``, refusing (naming ``what``)
    the two states it does not decode right on the CPU: its CPU inference layout (bf16 block scales, repacked at
    the first eval forward) and blocks that span rows (bitsandbytes 0.50 misplaces their scales)."""
    import bitsandbytes.functional as bnbf

    if getattr(state, "packing_format_for_cpu", False):
        raise UnsupportedError(f"{what} was repacked by bitsandbytes for CPU inference (bf16 block scales), which "
                               "has no dequantisation; use the model in train mode")
    if codes.device.type == "cpu" and state.blocksize > state.shape[-1]:
        raise UnsupportedError(f"{what}: bitsandbytes' CPU dequantize_4bit decodes blocks that span rows wrongly "
                               f"(block size {state.blocksize} > {state.shape[-1]} inputs)")
    return bnbf.dequantize_4bit(codes, state)


def weight_shape(module: nn.Module, parameter: str = "weight") -> list[int]:
    """The shape of ``module.<parameter>`` as the layer stores it; a quantised weight's logical ``[out, in]``."""
    if parameter == "weight" and held_quantized(module):
        return [module.out_features, module.in_features]
    return list(getattr(module, parameter).shape)


def to_function_layout(param: torch.Tensor, transposed: bool) -> torch.Tensor:
    return param.t() if transposed else param


def find_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that names the missing path."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        from ..errors import BaseMismatchError

        raise BaseMismatchError(f"the model has no module {path!r}") from None
