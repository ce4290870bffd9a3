"""How a delta reaches a torch module: the module's function with a given weight, and its layout.

Delta kinds are defined on the *function layout* of a layer: a weight of shape ``[out, in, ...]`` as in
``nn.Linear`` / ``nn.Conv2d``. Layers that store their weight the other way round (GPT-2's ``Conv1D``,
``nn.Embedding`` viewed as a map from one-hot rows) are "transposed"; this module knows which is which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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

    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
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


def to_function_layout(param: torch.Tensor, transposed: bool) -> torch.Tensor:
    return param.t() if transposed else param


def find_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that names the missing path."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        from ..errors import BaseMismatchError

        raise BaseMismatchError(f"the model has no module {path!r}") from None
