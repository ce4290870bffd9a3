"""Multiplicative methods: OFT, BOFT and HRA, whose adapters multiply a weight by an orthogonal matrix
instead of adding to it (spec section 6.10.7).

Each kind builds a matrix ``G`` (``[d, d]``) from its stored tensors and acts on a 2-D module in function
layout (``W_f`` ``[out, n_in]``, ``params.transposed`` for GPT-2 ``Conv1D`` / ``nn.Embedding``):

- ``params.side = "input"`` (default): the module sees ``x @ G`` for its input ``x``, so merged
  ``W'_f = W_f @ G^T`` (``d = n_in``); an optional ``output_scale`` (``[out]``, BOFT's ``boft_s``) then scales
  each output row: ``W'_f = diag(s) @ W_f @ G^T``. The bias is unchanged.
- ``params.side = "output"``: the module's output less its bias is multiplied, ``y' = (y - b) @ G + b``;
  merged ``W'_f = G^T @ W_f`` (``d = out``). PEFT's OFT on an ``nn.Embedding`` is this case.
- A 4-D ``nn.Conv2d`` weight ``[out, c, kh, kw]`` (input side only): ``G`` acts on its flattened
  ``c * kh * kw`` axis, ``W' = reshape(W.reshape(out, -1) @ G^T)``, and unmerged the module's own
  convolution runs with ``W'``: ``y' = y + conv(x; W' - W)`` (PEFT's merged form for all three). Training on a
  Conv2d goes through this form too, so it follows PEFT's BOFT and HRA training (their unmerged forward is their
  merge for dilation 1) and PEFT's OFT training on 1x1 kernels; on larger kernels PEFT's unmerged OFT
  (stride-1 patches rotated and folded back) is another function than its own merge, and ours is the merge.
  Grouped and dilated convolutions train the same way (``G`` on the ``c / groups * kh * kw`` axis, the module's own
  convolution); PEFT refuses grouped ones. A ``padding_mode`` other than zeros is refused.

Kinds:

- ``cayley`` (OFT): role ``skew`` ``[k, b(b-1)/2]``, the strict upper triangles of ``k`` skew-symmetric
  ``b x b`` blocks ``Q_i``; ``C_i = (I - Q_i)(I + Q_i)^-1``, or with ``params.series = [c_1 .. c_m]`` the
  polynomial ``I + sum_j c_j Q_i^j`` (PEFT's truncated Neumann form); ``G = blockdiag(C_i)`` over ``d / b``
  blocks, one shared block when ``k = 1``.
- ``butterfly`` (BOFT): role ``blocks`` ``[N, D, H, H]`` (their skew parts are used), optional
  ``output_scale``; ``G = M_{N-1} ... M_0``, ``M_f = P_f blockdiag(C_f) P_f^T`` with BOFT's butterfly
  permutations ``P_f`` (identity for ``f = 0``).
- ``householder`` (HRA): role ``vectors`` ``[d, r]``; ``G = H_{r-1} ... H_0`` with
  ``H_i = I - 2 u_i u_i^T / |u_i|^2``, or with ``params.orthogonalize`` ``G = I - 2 Q Q^T`` for ``Q`` the
  modified Gram-Schmidt orthonormalisation of the columns.

None is additive (``W + dW``): delta-space merges refuse them; ``merge --base`` (bake) multiplies them in,
adapter after adapter. Merged, the module's old weight is kept, so unmerge restores it exactly.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, ClassVar

import torch
from torch import nn

import adapterfmt as af

ROTATION = "_rotation"
"""Key of the bound tensors under which :meth:`MultiplicativeKind.bind` caches ``G``."""
SIDES = ("input", "output")


def _fail(module: str, msg: str) -> af.FormatError:
    return af.FormatError(f"module {module!r}: {msg}")


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def triangle_side(n: int) -> int | None:
    """``b`` with ``b (b - 1) / 2 == n`` (the block size of a stored strict upper triangle), else None."""
    b = (1 + math.isqrt(1 + 8 * n)) // 2
    return b if b * (b - 1) // 2 == n and b >= 2 else None


def neumann_series(terms: int) -> list[float]:
    """The coefficients ``[c_1 .. c_m]`` of PEFT's ``use_cayley_neumann`` polynomial ``I + sum c_j Q^j`` for
    ``num_cayley_neumann_terms = terms`` (PEFT 0.21: 2 for every power but the last, which gets 1; 3 and 4
    terms both stop at Q^3)."""
    if terms <= 1:
        return []
    if terms == 2:
        return [2.0]
    m = max(3, terms - 1)
    return [2.0] * (m - 1) + [1.0]


def series_terms(series: list[float] | None) -> int | None:
    """The ``num_cayley_neumann_terms`` giving ``series`` (None: the exact Cayley transform); raises when no
    PEFT setting gives it."""
    if series is None:
        return None
    for n in range(1, len(series) + 3):
        if neumann_series(n) == [float(c) for c in series]:
            return n
    raise af.UnsupportedError(f"params.series {series} is not a PEFT Cayley-Neumann polynomial")


def skew_from_triangle(vec: torch.Tensor, b: int) -> torch.Tensor:
    """``[k, n]`` strict upper triangles (row-major) -> ``[k, b, b]`` skew-symmetric matrices."""
    rows, cols = torch.triu_indices(b, b, 1)
    q = vec.new_zeros(vec.shape[0], b, b)
    q[:, rows, cols] = vec
    return q - q.transpose(1, 2)


def cayley(q: torch.Tensor, series: list[float] | None = None) -> torch.Tensor:
    """``(I - Q)(I + Q)^-1`` per block of ``q`` (``[k, b, b]``), or ``I + sum_j series[j-1] Q^j``."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    if series is None:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    out, power = eye.clone(), eye
    for c in series:
        power = power @ q
        out = out + float(c) * power
    return out


def butterfly_perm(d: int, groups: int, half: int) -> torch.Tensor:
    """BOFT's permutation: ``d`` indices in ``groups`` equal groups; each group cut into chunks of ``half``;
    within a group the even-numbered chunks come first, then the odd-numbered ones. ``(P x)[i] = x[perm[i]]``."""
    length = d // groups
    chunks = torch.arange(length).reshape(length // half, half)
    order = torch.cat([chunks[0::2], chunks[1::2]]).reshape(-1)
    return (torch.arange(0, d, length)[:, None] + order[None, :]).reshape(-1)


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Modified Gram-Schmidt on the columns of ``u`` (each normalised after its projections are removed)."""
    qs: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for q in qs:
            v = v - (q @ v) * q
        qs.append(v / v.norm())
    return torch.stack(qs, dim=1)


def _digest(p: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (no copy for a contiguous CPU tensor)."""
    data = p.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


# ----- the kinds ----------------------------------------------------------------------------------------
class MultiplicativeKind(af.DeltaKind):
    """A kind that multiplies a 2-D weight by ``G`` (see the module docstring); subclasses build ``G``."""

    additive = False
    layout_sensitive = True
    optional_roles: tuple[str, ...] = ()

    def rotation(self, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
        """``G`` (``[d, d]``) in at least float32."""
        raise NotImplementedError

    def check_roles(self, module: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]], d: int) -> None:
        raise NotImplementedError

    @staticmethod
    def side(entry: dict[str, Any]) -> str:
        return entry.get("params", {}).get("side", "input")

    def dim(self, entry: dict[str, Any]) -> int:
        fshape = af.function_shape(entry)
        return math.prod(fshape[1:]) if self.side(entry) == "input" else fshape[0]

    @staticmethod
    def is_conv(entry: dict[str, Any]) -> bool:
        """A 4-D target: a Conv2d weight ``[out, c, kh, kw]``, rotated on its flattened ``c * kh * kw`` axis."""
        return len(entry["shape"]) == 4

    def check(self, module: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
        fshape = af.function_shape(entry)
        if self.side(entry) not in SIDES:
            raise _fail(module, f"params.side must be 'input' or 'output', not {self.side(entry)!r}")
        if len(fshape) != 2 and not (len(fshape) == 4 and self.side(entry) == "input" and not self.transposed(entry)):
            raise _fail(module, f"kind {self.name} adapts 2-D weights, or a 4-D convolution weight on the input "
                                f"side (not transposed); shape is {list(entry['shape'])}")
        if "output_scale" in shapes and (self.side(entry) != "input" or shapes["output_scale"] != (fshape[0],)):
            raise _fail(module, f"output_scale {list(shapes['output_scale'])} must be [{fshape[0]}] and needs "
                                "side 'input'")
        self.check_roles(module, entry, shapes, self.dim(entry))

    def check_module(self, path: str, entry: dict[str, Any], module: nn.Module) -> None:
        super().check_module(path, entry, module)
        if isinstance(module, nn.Embedding) and self.side(entry) == "input":
            raise af.FormatError(f"module {path!r} is an embedding (token ids in): a {self.name} entry on it "
                                 "needs params.side 'output'")

    def acts_first(self, entry: dict[str, Any]) -> bool:
        """An input-side rotation acts on the input of the module the earlier adapters made, which an unmerged
        forward given their summed output cannot compute (spec 6.10.7: refused, merge them first)."""
        return self.side(entry) == "input"

    def bind(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**t, ROTATION: self.rotation(entry, t)}

    def _rotation(self, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t[ROTATION] if ROTATION in t else self.rotation(entry, t)

    def forward(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        if self.is_conv(entry):  # the rotated weight, through the module's own convolution
            w = module.weight
            return y + af.weight_function(module, x, (self.merged_function_weight(entry, t, w) - w).to(y.dtype))
        g = self._rotation(entry, t).to(y.dtype)
        bias = getattr(module, "bias", None)
        b = bias.to(y.dtype) if isinstance(bias, torch.Tensor) else torch.zeros((), dtype=y.dtype, device=y.device)
        if self.side(entry) == "output":
            return (y - b) @ g + b
        w = module.weight.to(y.dtype)
        z = y + af.weight_function(module, x.to(y.dtype) @ g - x.to(y.dtype), w.t() if self.transposed(entry) else w)
        if "output_scale" in t:
            z = (z - b) * t["output_scale"].to(y.dtype) + b
        return z

    def merged_function_weight(self, entry: dict[str, Any], t: dict[str, torch.Tensor],
                               w_f: torch.Tensor) -> torch.Tensor:
        """``W'_f`` for the function-layout weight ``w_f`` (computed in ``w_f``'s dtype, at least float32); a 4-D
        weight is rotated as its ``[out, c * kh * kw]`` flattening."""
        w_f = _wide(w_f)
        g = self._rotation(entry, t).to(w_f.dtype)
        if self.side(entry) == "output":
            return g.t() @ w_f
        new = w_f.reshape(w_f.shape[0], -1) @ g.t()
        new = new * t["output_scale"].to(w_f.dtype)[:, None] if "output_scale" in t else new
        return new.reshape(w_f.shape)

    def merge(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> Any:
        """Returns the old weight and a digest of the merged one, for :meth:`unmerge`."""
        p = getattr(module, entry.get("parameter", "weight"))
        old = p.detach().clone()
        w_f = p.t() if self.transposed(entry) else p
        new = self.merged_function_weight(entry, t, w_f.detach())
        with torch.no_grad():
            p.copy_((new.t() if self.transposed(entry) else new).to(p.dtype))
        return old, _digest(p)

    def unmerge(self, module: nn.Module, entry: dict[str, Any], t: dict[str, torch.Tensor], state: Any) -> None:
        p = getattr(module, entry.get("parameter", "weight"))
        old, digest = state
        if _digest(p) != digest:
            raise af.AdapterError(f"the weight of a module merged with a {self.name} entry was changed after the "
                                  "merge; unmerge the adapters merged after it first (last merged, first unmerged)")
        with torch.no_grad():
            p.copy_(old)


class Cayley(MultiplicativeKind):
    """OFT: block-diagonal Cayley rotations (6.10.7)."""

    name = "cayley"
    required_roles = ("skew",)
    # helpers format plugins reach through the kind (they import nothing but adapterfmt)
    triangle_side = staticmethod(triangle_side)
    neumann_series = staticmethod(neumann_series)
    series_terms = staticmethod(series_terms)

    @staticmethod
    def series(entry: dict[str, Any]) -> list[float] | None:
        return entry.get("params", {}).get("series")

    def check_roles(self, module: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]], d: int) -> None:
        s = shapes["skew"]
        b = triangle_side(s[1]) if len(s) == 2 else None
        if b is None or d % b or s[0] not in (1, d // b):
            raise _fail(module, f"skew {list(s)} must be [k, b(b-1)/2] with b dividing {d} and k = 1 or {d} / b")
        series = self.series(entry)
        if series is not None and (not isinstance(series, list) or not all(
                isinstance(c, (int, float)) and not isinstance(c, bool) for c in series)):
            raise _fail(module, "params.series must be a list of numbers")

    def rank(self, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> int:
        return triangle_side(shapes["skew"][1]) or 0

    def rotation(self, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
        vec = _wide(t["skew"])
        b = triangle_side(vec.shape[1])
        assert b is not None
        blocks = cayley(skew_from_triangle(vec, b), self.series(entry))
        n = self.dim(entry) // b
        return torch.block_diag(*(blocks[0 if blocks.shape[0] == 1 else i] for i in range(n)))


class Butterfly(MultiplicativeKind):
    """BOFT: products of permuted block-diagonal Cayley rotations, and an output scale (6.10.7)."""

    name = "butterfly"
    required_roles = ("blocks",)
    optional_roles = ("output_scale",)

    def check_roles(self, module: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]], d: int) -> None:
        s = shapes["blocks"]
        if len(s) != 4 or s[2] != s[3] or s[1] * s[2] != d:
            raise _fail(module, f"blocks {list(s)} must be [N, D, H, H] with D * H = {d}")
        n, blocks, h = s[0], s[1], s[2]
        if n > 1 and (h % 2 or blocks % 2 or blocks % 2 ** (n - 1)):
            raise _fail(module, f"blocks {list(s)}: {n} butterfly factors need H and D even, D a multiple of "
                                f"2^{n - 1}")

    def rank(self, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> int:
        return shapes["blocks"][2]

    def rotation(self, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
        m = _wide(t["blocks"])
        n, blocks, h = m.shape[0], m.shape[1], m.shape[2]
        d = blocks * h
        rots = cayley(0.5 * (m - m.transpose(-1, -2)).reshape(n * blocks, h, h)).reshape(n, blocks, h, h)
        g = torch.eye(d, dtype=m.dtype, device=m.device)
        for f in range(n):
            bd = torch.block_diag(*rots[f])
            perm = butterfly_perm(d, blocks // 2 ** f, h // 2) if f else torch.arange(d)
            g = bd[perm][:, perm] @ g  # P bd P^T, where (P x)[i] = x[perm[i]]
        return g


class Householder(MultiplicativeKind):
    """HRA: a product of Householder reflections, or one reflection of a Gram-Schmidt basis (6.10.7)."""

    name = "householder"
    required_roles = ("vectors",)

    def check_roles(self, module: str, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]], d: int) -> None:
        s = shapes["vectors"]
        if len(s) != 2 or s[0] != d or not 1 <= s[1] <= d:
            raise _fail(module, f"vectors {list(s)} must be [{d}, r] with 1 <= r <= {d}")
        if not isinstance(entry.get("params", {}).get("orthogonalize", False), bool):
            raise _fail(module, "params.orthogonalize must be true or false")

    def check_data(self, module: str, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        if bool((t["vectors"].double().norm(dim=0) == 0).any()):
            raise _fail(module, "a Householder vector is zero")

    def rank(self, entry: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> int:
        return shapes["vectors"][1]

    def rotation(self, entry: dict[str, Any], t: dict[str, torch.Tensor]) -> torch.Tensor:
        u = _wide(t["vectors"])
        eye = torch.eye(u.shape[0], dtype=u.dtype, device=u.device)
        if entry.get("params", {}).get("orthogonalize", False):
            q = gram_schmidt(u)
            return eye - 2 * q @ q.t()
        u = u / u.norm(dim=0)
        h = eye
        for i in range(u.shape[1]):  # H = H_0 H_1 ... H_{r-1}; G = H^T
            h = h - 2 * (h @ u[:, i:i + 1]) @ u[:, i:i + 1].t()
        return h.t()


# ----- methods ------------------------------------------------------------------------------------------
def _schema(extra: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {**extra, **af.TARGETS_SCHEMA}}


def _divisor(n: int, size: int, path: str, what: str) -> int:
    if n % size:
        raise af.UnsupportedError(f"module {path!r}: {what} {size} does not divide its {n} inputs "
                                  "(in_channels * kh * kw on a Conv2d)")
    return n // size


def _target(kind: str, path: str, module: nn.Module,
            params: dict[str, Any] | None = None) -> tuple[dict[str, Any], int]:
    """The module entry of ``kind`` for a training target, and ``d``, the length of the axis ``G`` rotates
    (``n_in``; ``c * kh * kw`` for a Conv2d)."""
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        raise af.UnsupportedError(f"module {path!r}: a Conv2d with padding_mode={module.padding_mode!r} cannot be "
                                  "trained (the rotated weight runs through a zero-padded convolution)")
    entry = af.module_entry(kind, module, params)
    return entry, math.prod(af.function_shape(entry)[1:])


class MultiplicativeMethod(af.Method):
    """The train verb shared by the three methods: one trainable entry per targeted Linear / Conv1D / Conv2d,
    initialised so that ``G = I`` (training starts at the base model)."""

    defaults: ClassVar[dict[str, Any]] = {}
    supported: ClassVar[tuple[type | str, ...]] = (nn.Linear, "Conv1D", nn.Conv2d)

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        cfg = {**self.defaults, **config}
        self.check_config(cfg)
        return af.inject(model, method=self.name, config=cfg, build=lambda p, m: self.layer(p, m, cfg),
                         supported=self.supported)

    def layer(self, path: str, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        raise NotImplementedError


class OFT(MultiplicativeMethod):
    name = "oft"
    summary = "OFT: the input multiplied by a block-diagonal orthogonal matrix (Cayley blocks)"
    kinds = ("cayley",)
    config_schema = _schema({"block_size": {"type": "integer", "minimum": 2},
                             "block_share": {"type": "boolean"},
                             "neumann_terms": {"type": ["integer", "null"], "minimum": 1}})
    defaults: ClassVar[dict[str, Any]] = {"block_size": 4, "block_share": False, "neumann_terms": None}

    def layer(self, path: str, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        b, terms = cfg["block_size"], cfg["neumann_terms"]
        entry, d = _target("cayley", path, module, {} if terms is None else {"series": neumann_series(terms)})
        blocks = _divisor(d, b, path, "block_size")
        k = 1 if cfg["block_share"] else blocks
        return af.TrainableDelta(entry, {"skew": torch.zeros(k, b * (b - 1) // 2, dtype=af.adapter_dtype(module))})


class BOFT(MultiplicativeMethod):
    name = "boft"
    summary = "BOFT: the input multiplied by a butterfly product of block-diagonal rotations, outputs scaled"
    kinds = ("butterfly",)
    config_schema = _schema({"block_size": {"type": "integer", "minimum": 2},
                             "butterfly_factor": {"type": "integer", "minimum": 1}})
    defaults: ClassVar[dict[str, Any]] = {"block_size": 4, "butterfly_factor": 1}

    def layer(self, path: str, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        entry, d = _target("butterfly", path, module)
        out, h, n = af.function_shape(entry)[0], cfg["block_size"], cfg["butterfly_factor"]
        blocks = _divisor(d, h, path, "block_size")
        dtype = af.adapter_dtype(module)
        params = {"blocks": torch.zeros(n, blocks, h, h, dtype=dtype), "output_scale": torch.ones(out, dtype=dtype)}
        td = af.TrainableDelta(entry, params)
        td.kind.check(path, entry, {r: tuple(v.shape) for r, v in params.items()})
        return td


class HRA(MultiplicativeMethod):
    name = "hra"
    summary = "HRA: the input multiplied by a product of r Householder reflections"
    kinds = ("householder",)
    config_schema = _schema({"r": {"type": "integer", "minimum": 1}, "orthogonalize": {"type": "boolean"}})
    defaults: ClassVar[dict[str, Any]] = {"r": 8, "orthogonalize": False}

    def layer(self, path: str, module: nn.Module, cfg: dict[str, Any]) -> af.TrainableDelta:
        """As HRA initialises: for even r each vector twice in a row, so the reflections cancel (G = I)."""
        entry, d = _target("householder", path, module, {"orthogonalize": cfg["orthogonalize"]})
        r = cfg["r"]
        if cfg["orthogonalize"] or r % 2:
            raise af.UnsupportedError("hra training starts at G = I only with an even r and orthogonalize false")
        if r > d:
            raise af.UnsupportedError(f"module {path!r}: hra r {r} exceeds the {d} inputs it reflects")
        half = torch.empty(d, r // 2, dtype=af.adapter_dtype(module))
        nn.init.kaiming_uniform_(half, a=math.sqrt(5))
        return af.TrainableDelta(entry, {"vectors": torch.repeat_interleave(half, 2, dim=1)})


@af.hookimpl
def adapterfmt_delta_kinds() -> list[af.DeltaKind]:
    return [Cayley(), Butterfly(), Householder()]


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [OFT(), BOFT(), HRA()]


__all__ = ["BOFT", "HRA", "OFT", "Butterfly", "Cayley", "Householder", "butterfly_perm", "neumann_series",
           "series_terms", "triangle_side"]
