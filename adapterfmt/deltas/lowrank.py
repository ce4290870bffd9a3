"""``lowrank``: dW = scale * B @ M @ A - c * B0 @ M0 @ A0 (spec 6.2, 6.2.1): an optional middle factor ``lora_mid``
(a diagonal or an r x r matrix), an optional base-derived part (``params.base_part``, stored as ``init_*`` factors
or recomputed from the base by a recipe of :mod:`.base_part`), DoRA magnitude, LoRA bias, a replaced module bias."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError
from .base import ROWS_CACHE_ATTR, DeltaKind, Entry, Tensors, fail
from .base_part import FACTOR_RECIPES, RECIPES, base_part, derived_tensors, is_derived, scale_columns
from .modules import function_weight, held_quantized, int8_scales, is_transposed, weight_function

if TYPE_CHECKING:
    import torch
    from torch import nn


def function_shape(entry: Entry) -> tuple[int, ...]:
    """Shape of the target weight in function layout (``[out, in, ...]``)."""
    shape = tuple(entry["shape"])
    return shape[::-1] if entry.get("params", {}).get("transposed") else shape


def channel_view(v: torch.Tensor, y: torch.Tensor, module: nn.Module | None) -> torch.Tensor:
    """Reshape a per-output-channel vector to broadcast against a module output ``y``."""
    from torch import nn

    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d) and y.dim() > 2:
        return v.reshape(1, -1, *([1] * (y.dim() - 2)))
    return v.reshape(-1)


class LowRank(DeltaKind):
    name = "lowrank"
    layout_sensitive = True
    on_quantized = True
    required_roles = ("lora_A", "lora_B")
    optional_roles = ("lora_mid", "magnitude", "bias", "bias_value")

    def roles(self, entry: Entry) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``lora_A`` / ``lora_B`` required except with an ``ldu`` / ``nystrom`` part (then optional);
        ``init_A`` / ``init_B`` required and ``init_mid`` optional with an explicit base part (spec 6.2.1)."""
        part = base_part(entry)
        if part is None:
            return self.required_roles, self.optional_roles
        if "recipe" in part:
            if part["recipe"] in FACTOR_RECIPES:
                return (), ("lora_A", "lora_B", *self.optional_roles)
            return self.required_roles, self.optional_roles
        return (*self.required_roles, "init_A", "init_B"), (*self.optional_roles, "init_mid")

    def check(self, module: str, entry: Entry, shapes: dict[str, tuple[int, ...]]) -> None:
        fshape = function_shape(entry)
        if len(fshape) < 2:
            raise fail(module, f"lowrank needs a weight of 2 or more dims, shape is {list(entry['shape'])}")
        out = fshape[0]
        part = base_part(entry)
        if ("lora_A" in shapes) != ("lora_B" in shapes):
            raise fail(module, "lora_A and lora_B are both stored or both derived from an ldu / nystrom base_part")
        if "lora_A" in shapes:
            r = self._check_pair(module, shapes, "lora_A", "lora_B", fshape)
        else:
            r = int(part["rank"])
        self._check_mid(module, shapes, "lora_mid", r)
        if part is not None:
            self._check_part(module, part, shapes, fshape)
        for role in ("magnitude", "bias", "bias_value"):
            if role in shapes and math.prod(shapes[role]) != out:
                raise fail(module, f"{role} has shape {list(shapes[role])}, expected [{out}]")
        if "magnitude" in shapes and "bias" in shapes:
            raise fail(module, "lowrank cannot have both magnitude (DoRA) and bias (LoRA bias), as in PEFT")
        if not isinstance(entry.get("params", {}).get("scale", 1.0), int | float):
            raise fail(module, "lowrank params.scale must be a number")

    @staticmethod
    def _check_pair(module: str, shapes: dict[str, tuple[int, ...]], ra: str, rb: str, fshape: tuple[int, ...]) -> int:
        a, b = shapes[ra], shapes[rb]
        out, n_in = fshape[0], math.prod(fshape[1:])
        if len(a) < 2 or len(b) < 2:
            raise fail(module, f"{ra} {list(a)} and {rb} {list(b)} must have 2 or more dims")
        r = a[0]
        if math.prod(a[1:]) != n_in:
            raise fail(module, f"{ra} has shape {list(a)}, expected [r, {', '.join(map(str, fshape[1:]))}]")
        if b[0] != out or math.prod(b[1:]) != r:
            raise fail(module, f"{rb} has shape {list(b)}, expected [{out}, {r}] (rank from {ra})")
        return r

    @staticmethod
    def _check_mid(module: str, shapes: dict[str, tuple[int, ...]], role: str, r: int) -> None:
        if role in shapes and shapes[role] not in ((r,), (r, r)):
            raise fail(module, f"{role} has shape {list(shapes[role])}, expected [{r}] or [{r}, {r}]")

    def _check_part(self, module: str, part: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                    fshape: tuple[int, ...]) -> None:
        if not isinstance(part.get("scale"), int | float) or isinstance(part.get("scale"), bool):
            raise fail(module, "params.base_part.scale must be a number")
        if "recipe" not in part:
            r0 = self._check_pair(module, shapes, "init_A", "init_B", fshape)
            self._check_mid(module, shapes, "init_mid", r0)
            return
        recipe, r0 = part["recipe"], part.get("rank")
        if recipe not in RECIPES or not isinstance(r0, int) or isinstance(r0, bool):
            raise fail(module, f"params.base_part needs a recipe among {', '.join(RECIPES)} and an integer rank")
        k = min(fshape[0], math.prod(fshape[1:]))
        hi = k - 1 if recipe == "svd_bottom" else k
        if not 1 <= r0 <= hi:
            raise fail(module, f"params.base_part.rank {r0} is outside [1, {hi}] for {recipe}")
        rows = part.get("rows")
        if (recipe == "ldu") != (rows is not None):
            raise fail(module, "params.base_part.rows is required with recipe ldu and forbidden otherwise")
        if rows is not None and (len(rows) != r0 or len(set(rows)) != r0
                                 or not all(isinstance(i, int) and 0 <= i < fshape[0] for i in rows)):
            raise fail(module, f"params.base_part.rows must be {r0} distinct integers in [0, {fshape[0]})")

    def rank(self, entry: Entry, shapes: dict[str, tuple[int, ...]]) -> int:
        return shapes["lora_A"][0] if "lora_A" in shapes else int(base_part(entry)["rank"])

    def is_additive(self, entry: Entry, roles: Collection[str]) -> bool:
        return "magnitude" not in roles and "bias_value" not in roles

    @staticmethod
    def scale(entry: Entry) -> float:
        return float(entry.get("params", {}).get("scale", 1.0))

    @staticmethod
    def plain(entry: Entry, t: Tensors) -> bool:
        """True for ``scale * B @ A`` alone: no middle factor and no base part."""
        return "lora_mid" not in t and base_part(entry) is None

    def factors(self, entry: Entry, t: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B' [out, k], A' [k, n_in])`` in function layout, at least fp32, with ``dW_f = B' @ A'``: the
        scale and middle factor folded into B', the base part appended as ``-c * B0 M0`` / ``A0`` (k = r + r0).
        A derived part must have been resolved against the base (:meth:`bind`, ``make_explicit``)."""
        import torch

        part = base_part(entry)
        if part is not None and "recipe" in part and (
                "lora_A" not in t or (float(part["scale"]) != 0.0 and "init_A" not in t)):
            raise UnsupportedError(f"a lowrank entry with a derived base_part ({part['recipe']}) is computed from "
                                   "the base weight: attach it to the base, or make it explicit with the base first "
                                   "(make_explicit / --base)")
        a, b = wide(t["lora_A"]), wide(t["lora_B"])
        r = a.shape[0]
        b2 = self.scale(entry) * scale_columns(b.reshape(b.shape[0], r), t.get("lora_mid"))
        a2 = a.reshape(r, -1)
        if part is None or float(part["scale"]) == 0.0:
            return b2, a2
        a0, b0 = wide(t["init_A"]), wide(t["init_B"])
        r0 = a0.shape[0]
        b0 = -float(part["scale"]) * scale_columns(b0.reshape(b0.shape[0], r0).to(b2.dtype), t.get("init_mid"))
        return torch.cat([b2, b0], 1), torch.cat([a2, a0.reshape(r0, -1).to(a2.dtype)], 0)

    def function_delta(self, entry: Entry, t: Tensors) -> torch.Tensor:
        """The complete ``dW_f`` of spec 6.2 / 6.2.1 in function layout, at least fp32."""
        fshape = function_shape(entry)
        if self.plain(entry, t):
            a, b = wide(t["lora_A"]), wide(t["lora_B"])
            r = a.shape[0]
            return (self.scale(entry) * (b.reshape(b.shape[0], r) @ a.reshape(r, -1))).reshape(fshape)
        b2, a2 = self.factors(entry, t)
        return (b2 @ a2).reshape(fshape)

    def delta(self, entry: Entry, t: Tensors) -> torch.Tensor:
        if "magnitude" in t or "bias_value" in t:
            return super().delta(entry, t)
        fw = self.function_delta(entry, t)
        return fw.t() if entry.get("params", {}).get("transposed") else fw

    def _lora_out(self, module: nn.Module, entry: Entry, t: Tensors, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F
        from torch import nn

        from .. import kernels

        if self.plain(entry, t):
            a, b, s = t["lora_A"], t["lora_B"], self.scale(entry)
        else:
            b, a = self.factors(entry, t)
            s = 1.0
            a = a.reshape(a.shape[0], *function_shape(entry)[1:])
        if isinstance(module, nn.Conv2d):
            b4 = b.reshape(b.shape[0], a.shape[0], 1, 1).to(x.dtype)
            mid = F.conv2d(x, a.to(x.dtype), None, module.stride, module.padding, module.dilation, module.groups)
            return s * F.conv2d(mid, b4)
        if isinstance(module, nn.Embedding):
            mid = F.embedding(x, a.t(), module.padding_idx, module.max_norm, module.norm_type,
                              module.scale_grad_by_freq, module.sparse)
            return s * (mid @ b.reshape(b.shape[0], -1).t().to(mid.dtype))
        if _is_linear(module):
            return kernels.lora_delta(x, a.reshape(a.shape[0], -1).to(x.dtype), b.reshape(b.shape[0], -1).to(x.dtype), s)
        return weight_function(module, x, self.function_delta(entry, t).to(x.dtype))

    def bind(self, module: nn.Module, entry: Entry, t: Tensors) -> Tensors:
        """Checks a ``bias_value`` has a bias to replace, and resolves a derived base part from the module's
        weight (spec 6.2.1: the parameter before this adapter changes it); the caller checks the base's
        fingerprint first. Forward, merge and unmerge then use these fixed tensors, so unmerge is exact."""
        import torch

        if "bias_value" in t and getattr(module, "bias", None) is None:
            raise UnsupportedError(f"a lowrank bias_value replaces the module's bias, but this "
                                   f"{type(module).__name__} has none")
        _check_dora_base(module, t)
        if not is_derived(entry):
            return t
        w = self._function_weight(module, entry).detach()
        ref = next((v for v in t.values() if v.is_floating_point()), w)
        return {**t, **derived_tensors(entry, w, dtype=ref.dtype if ref.is_floating_point() else torch.float32)}

    def forward(self, module: nn.Module, entry: Entry, t: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torch

        from .. import kernels

        if _is_linear(module) and len(t) == 2 and self.plain(entry, t) and x.dtype == y.dtype:
            # y + scale * (x A^T) B^T through the kernel dispatcher (Triton on CUDA, fused addmm on the CPU)
            a, b = t["lora_A"].to(x.dtype), t["lora_B"].to(x.dtype)
            if torch.is_grad_enabled() and (y.requires_grad or a.requires_grad or b.requires_grad):
                # out of place: in training ``y`` may be a view a custom autograd Function returned (bitsandbytes);
                # one addmm: no delta-sized intermediates (PEFT's lora.Linear: two in the forward, one in the backward)
                y2, x2 = y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
                return torch.addmm(y2, x2 @ a.t(), b.t(), alpha=self.scale(entry)).view(y.shape)
            return kernels.lora_delta(x, a, b, self.scale(entry), out=y)
        if "bias_value" in t:  # the module's bias b is replaced: y - b + bias_value
            y = y + channel_view((t["bias_value"] - module.bias).to(y.dtype), y, module)
        out = self._lora_out(module, entry, t, x).to(y.dtype)
        if "bias" in t:
            out = out + channel_view(self.scale(entry) * t["bias"].to(y.dtype), y, module)
        if "magnitude" not in t:
            return y + out
        _check_dora_base(module, t)
        w = self._function_weight(module, entry)
        norm = self._dora_norm(w, entry, t).detach()
        mns = channel_view((wide(t["magnitude"].reshape(-1)) / norm).to(y.dtype), y, module)
        base_nobias = weight_function(module, x, w.to(y.dtype))
        return y + (mns - 1) * base_nobias + mns * out

    def forward_rows(self, module: nn.Module, present: list[tuple[int, Any]], x: torch.Tensor, y: torch.Tensor,
                     ids: torch.Tensor) -> torch.Tensor | None:
        """Per-row adapters in one batched pass: row ``i`` gets adapter ``ids[i]`` (-1: none).

        The adapters' factors are stacked into a zero-padded pool (cached on the module until the set of
        attached adapters changes) and the whole batch goes through ``kernels.multi_lora_rows`` (BGMV-style
        Triton kernel on CUDA; gathered ``bmm`` or grouped ``index_add`` on the CPU), whatever the mix.
        Returns None (the caller then groups rows by adapter) for DoRA entries, entries replacing the
        module's bias (``bias_value``) and non-linear modules.
        """
        import torch

        from .. import kernels

        if not _is_linear(module) or x.dim() < 2 or x.shape[0] != ids.shape[0] or x.dtype != y.dtype:
            return None
        if any("magnitude" in b.tensors or "bias_value" in b.tensors or not self.plain(b.entry, b.tensors)
               for _, b in present):
            return None
        pool_a, pool_b, pool_bias = _pool(module, present)
        zero = pool_a.shape[0] - 1
        ids = torch.where(ids >= zero, -1, ids)
        out = kernels.multi_lora_rows(x, y, pool_a, pool_b, _ones(pool_a), ids)
        if pool_bias is not None:
            idx = torch.where(ids < 0, zero, ids)
            out = out + pool_bias[idx].reshape(-1, *([1] * (y.dim() - 2)), y.shape[-1])
        return out

    def _function_weight(self, module: nn.Module, entry: Entry) -> torch.Tensor:
        if held_quantized(module):
            return function_weight(module)
        w = getattr(module, entry.get("parameter", "weight"))
        return w.t() if self.transposed(entry) else w

    def _dora_norm(self, w_f: torch.Tensor, entry: Entry, t: Tensors) -> torch.Tensor:
        full = wide(w_f) + self.function_delta(entry, t)
        return full.reshape(full.shape[0], -1).norm(p=2, dim=1)

    def merge(self, module: nn.Module, entry: Entry, t: Tensors) -> Any:
        """Returns ``(weight state, the replaced bias or None)`` for :meth:`unmerge`; refuses a module that holds its
        weight quantised (re-quantising ``W + dW`` would lose the delta and unmerge could not restore ``W``)."""
        import torch

        if held_quantized(module):
            raise UnsupportedError(f"cannot merge into a {type(module).__name__}, which holds its weight quantised: "
                                   "keep the adapter unmerged, or bake it into the quantised checkpoint")

        if "bias" in t and getattr(module, "bias", None) is None:
            raise UnsupportedError(f"cannot merge a LoRA bias into {type(module).__name__} without a bias; "
                                   "keep the adapter unmerged")
        old_bias = None
        if "bias_value" in t:
            self.bind(module, entry, t)
            old_bias = module.bias.detach().clone()
            with torch.no_grad():
                module.bias.copy_(t["bias_value"].reshape(module.bias.shape).to(module.bias.dtype))
        return self._merge_weight(module, entry, t), old_bias

    def _merge_weight(self, module: nn.Module, entry: Entry, t: Tensors) -> Any:
        import torch

        param = getattr(module, entry.get("parameter", "weight"))
        tr = self.transposed(entry)
        with torch.no_grad():
            if "bias" in t:
                module.bias.add_((self.scale(entry) * wide(t["bias"])).to(module.bias.dtype))
            if "magnitude" not in t:
                fw = self.function_delta(entry, t)
                param.add_((fw.t() if tr else fw).to(param.dtype))
                return None
            w_f = self._function_weight(module, entry)
            norm = self._dora_norm(w_f, entry, t)
            full = wide(w_f) + self.function_delta(entry, t)
            scale = (wide(t["magnitude"].reshape(-1)) / norm).reshape(-1, *([1] * (full.dim() - 1)))
            merged = scale * full
            param.copy_((merged.t() if tr else merged).to(param.dtype))
            return norm

    def unmerge(self, module: nn.Module, entry: Entry, t: Tensors, state: Any) -> None:
        import torch

        state, old_bias = state
        param = getattr(module, entry.get("parameter", "weight"))
        tr = self.transposed(entry)
        with torch.no_grad():
            if old_bias is not None:
                module.bias.copy_(old_bias)
            elif "bias" in t:
                module.bias.sub_((self.scale(entry) * wide(t["bias"])).to(module.bias.dtype))
            fw = self.function_delta(entry, t)
            if "magnitude" not in t:
                param.sub_((fw.t() if tr else fw).to(param.dtype))
                return
            w_f = wide(self._function_weight(module, entry))
            scale = (wide(t["magnitude"].reshape(-1)) / state).reshape(-1, *([1] * (w_f.dim() - 1)))
            orig = w_f / scale - fw
            param.copy_((orig.t() if tr else orig).to(param.dtype))


def _check_dora_base(module: nn.Module, t: Tensors) -> None:
    """DoRA rescales ``x W^T``: refused on a quantised module whose product is not that of its dequantised weight."""
    if "magnitude" in t and held_quantized(module) and int8_scales(module) is not None:
        raise UnsupportedError(f"DoRA on a bitsandbytes {type(module).__name__}: its int8 product also quantises the "
                               "input, so it is not the x W^T that DoRA rescales")


def _ones(pool_a: torch.Tensor) -> torch.Tensor:
    """Per-adapter scales of a pool whose B factors already carry their scale."""
    import torch

    return torch.ones(pool_a.shape[0], dtype=torch.float32, device=pool_a.device)


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least fp32 (fp64 stays fp64, so merges into fp64 models are exact to fp64)."""
    import torch

    return t.to(torch.promote_types(t.dtype, torch.float32))


def _is_linear(module: nn.Module) -> bool:
    from torch import nn

    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D" or held_quantized(module)


def _pool(module: nn.Module, present: list[tuple[int, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Stacked factors ``A [n+1, R, in]``, ``B * scale [n+1, out, R]``, bias ``[n+1, out]`` (or None) of the
    adapters in ``present`` by slot index, zero-padded to the largest rank R; the last slot is all zeros
    (rows without an adapter). Cached on the module, keyed by the bound adapters themselves."""
    n = max(i for i, _ in present) + 1
    cached = module.__dict__.get(ROWS_CACHE_ATTR)
    if cached is not None and len(cached[0]) == len(present) and \
            all(i == j and b is c for (i, b), (j, c) in zip(cached[0], present, strict=True)):
        return cached[1]
    ref = present[0][1].tensors["lora_A"]
    r_max = max(b.tensors["lora_A"].shape[0] for _, b in present)
    n_in = ref.reshape(ref.shape[0], -1).shape[1]
    out = present[0][1].tensors["lora_B"].shape[0]
    pool_a = ref.new_zeros(n + 1, r_max, n_in)
    pool_b = ref.new_zeros(n + 1, out, r_max)
    has_bias = any("bias" in b.tensors for _, b in present)
    pool_bias = ref.new_zeros(n + 1, out) if has_bias else None
    for i, b in present:
        a, bb = b.tensors["lora_A"], b.tensors["lora_B"]
        r, s = a.shape[0], LowRank.scale(b.entry)
        pool_a[i, :r] = a.reshape(r, -1)
        pool_b[i, :, :r] = s * bb.reshape(out, r)
        if "bias" in b.tensors:
            pool_bias[i] = s * b.tensors["bias"].reshape(-1)
    pool = (pool_a, pool_b, pool_bias)
    module.__dict__[ROWS_CACHE_ATTR] = (list(present), pool)
    return pool


def lowrank_entry(shape: list[int] | tuple[int, ...], scale: float, *, transposed: bool = False,
                  **params: Any) -> dict[str, Any]:
    """A module entry of kind ``lowrank``."""
    p: dict[str, Any] = {"scale": float(scale), **params}
    if transposed:
        p["transposed"] = True
    return {"kind": "lowrank", "shape": list(shape), "params": p}


__all__ = ["LowRank", "lowrank_entry", "function_shape", "channel_view", "is_transposed"]
