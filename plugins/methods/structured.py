"""Structured additive methods (as PEFT 0.21 computes them) and the delta kinds they need.

Methods, and how each is stored:

- ``shira`` (SHiRA): a sparse high-rank delta, kind ``sparse`` (spec 6.4): PEFT's ``shira_indices``
  (row, column) pairs become sorted flat indices, ``shira_weight`` the values, ``scale`` 1.
- ``ln_tuning`` (LN tuning): the trained copy of each targeted layer's parameters, kind ``dense`` mode
  ``replace`` (``value`` = its weight, ``bias_value`` = its bias).
- ``fourierft`` (FourierFT): kind ``fourier``, the trained spectral coefficients and the frequencies
  they sit at (PEFT draws these from ``random_loc_seed``; here they are stored).
- ``vblora`` (VB-LoRA): kind ``vector_bank``, per-module logits over one shared vector bank.
- ``randlora`` (RandLoRA): kind ``randlora``, per-module diagonal scalings of shared random bases.
- ``c3a`` (C3A): kind ``circulant``, blocks of circulant matrices given by their first rows.
- ``miss`` (MiSS, formerly Bone): kind ``block_share``, one small block tiled over the weight (modes
  ``tile``) or PEFT's weight-dependent ``bat`` form.

The kinds' math is in the spec (sections 6.10.8 to 6.10.12). All are defined in **function layout**
(``params.transposed`` marks a target stored ``[in, out]``, as for the weight-delta kinds of 6.10) on a
2-D weight ``[out, n_in]``. All but ``block_share`` mode ``bat`` are additive.

Training: each method has a ``train`` verb (VB-LoRA's shared vector bank is one parameter trained with every
module's logits).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import adapterfmt as af

Entry = dict[str, Any]
Tensors = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]


def _fail(module: str, msg: str) -> af.FormatError:
    return af.FormatError(f"module {module!r}: {msg}")


def _matrix(module: str, entry: Entry) -> tuple[int, int]:
    fshape = af.function_shape(entry)
    if len(fshape) != 2:
        raise _fail(module, f"kind {entry['kind']!r} adapts 2-D weights, shape is {list(entry['shape'])}")
    return fshape[0], fshape[1]


# ----- fourier (FourierFT) --------------------------------------------------------------------------------------
class Fourier(af.WeightDeltaKind):
    """``dW_f = scale * Re(ifft2(D))``, ``D`` zero but ``D.flat[indices[j]] = spectrum[j]`` (spec 6.10.8)."""

    name = "fourier"
    required_roles = ("spectrum", "indices")

    def check(self, module: str, entry: Entry, shapes: Shapes) -> None:
        out, n_in = _matrix(module, entry)
        s, i = shapes["spectrum"], shapes["indices"]
        if len(s) != 1 or i != s or s[0] > out * n_in:
            raise _fail(module, f"spectrum {list(s)} and indices {list(i)} must be 1-D of one length <= {out * n_in}")

    def check_data(self, module: str, entry: Entry, t: Tensors) -> None:
        idx = t["indices"]
        out, n_in = af.function_shape(entry)
        if idx.dtype != torch.int64:
            raise _fail(module, f"indices must be int64, got {idx.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= out * n_in):
            raise _fail(module, f"indices must lie in [0, {out * n_in})")
        if torch.unique(idx).numel() != idx.numel():
            raise _fail(module, "indices must not repeat")

    def param_count(self, entry: Entry, shapes: Shapes) -> int:
        return shapes["spectrum"][0]

    def function_delta(self, entry: Entry, t: Tensors) -> torch.Tensor:
        out, n_in = af.function_shape(entry)
        spectrum = t["spectrum"]
        dense = torch.zeros(out * n_in, dtype=spectrum.dtype, device=spectrum.device)
        dense[t["indices"]] = spectrum
        return self.scale(entry) * torch.fft.ifft2(dense.reshape(out, n_in)).real


# ----- vector_bank (VB-LoRA) -------------------------------------------------------------------------------------
def _mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """Each logit row's top-k bank vectors (ties to the lower position: a stable descending sort), weighted by
    the softmax of their logits: ``[..., L]``."""
    idx = torch.argsort(logits, dim=-1, descending=True, stable=True)[..., :topk]
    return (torch.softmax(logits.gather(-1, idx), dim=-1).unsqueeze(-1) * bank[idx]).sum(-2)


class VectorBank(af.WeightDeltaKind):
    """``A`` and ``B`` assembled from a shared vector bank by top-k logits (or the top-k positions and weights
    those give); ``dW_f = B @ A`` (spec 6.10.9). Equal logits go to the lower bank position, as the spec says;
    PEFT's ``torch.topk`` leaves ties unspecified, so it may pick other vectors, only where logits tie exactly."""

    name = "vector_bank"
    TOPK_ROLES = ("topk_indices_A", "topk_weights_A", "topk_indices_B", "topk_weights_B")
    optional_roles = ("logits_A", "logits_B", *TOPK_ROLES)

    def check(self, module: str, entry: Entry, shapes: Shapes) -> None:
        out, n_in = _matrix(module, entry)
        params = entry.get("params", {})
        if set(params.get("shared", {})) != {"vector_bank"}:
            raise _fail(module, "vector_bank needs params.shared naming the vector_bank tensor")
        bank = shapes["vector_bank"]
        if len(bank) != 2:
            raise _fail(module, f"the shared vector_bank must be 2-D [N, L], is {list(bank)}")
        n, length = bank
        topk = params.get("topk")
        if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= n:
            raise _fail(module, f"params.topk must be an integer in [1, {n}], got {topk!r}")
        if out % length or n_in % length:
            raise _fail(module, f"vector length {length} must divide {out} and {n_in}")
        roles = set(shapes) - {"vector_bank"}
        if roles not in ({"logits_A", "logits_B"}, set(self.TOPK_ROLES)):
            raise _fail(module, f"vector_bank needs logits_A and logits_B, or {', '.join(self.TOPK_ROLES)}; has "
                                f"{sorted(roles)}")
        topk_form = "logits_A" not in roles
        la, lb = (shapes["topk_indices_A"], shapes["topk_indices_B"]) if topk_form else (shapes["logits_A"], shapes["logits_B"])
        last, r = topk if topk_form else n, la[0] if la else 0
        if la != (r, n_in // length, last) or lb != (out // length, r, last):
            raise _fail(module, f"{'topk_indices' if topk_form else 'logits'}_A {list(la)} / _B {list(lb)} must be "
                                f"[r, {n_in // length}, {last}] / [{out // length}, r, {last}]")
        if topk_form and (shapes["topk_weights_A"] != la or shapes["topk_weights_B"] != lb):
            raise _fail(module, "topk_weights_A / _B must have the shapes of topk_indices_A / _B")

    def check_data(self, module: str, entry: Entry, t: Tensors) -> None:
        n = t["vector_bank"].shape[0]
        for role in ("topk_indices_A", "topk_indices_B"):
            idx = t.get(role)
            if idx is not None and (idx.dtype != torch.int64 or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n))):
                raise _fail(module, f"{role} must be int64 positions in [0, {n})")

    def rank(self, entry: Entry, shapes: Shapes) -> int:
        return shapes.get("logits_A", shapes.get("topk_indices_A", (0,)))[0]

    def param_count(self, entry: Entry, shapes: Shapes) -> int:
        return sum(math.prod(s) for r, s in shapes.items() if r != "vector_bank")

    @staticmethod
    def factors(entry: Entry, t: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B [out, r], A [r, n_in])``."""
        k, bank = int(entry["params"]["topk"]), t["vector_bank"]

        def mix(side: str) -> torch.Tensor:
            if f"logits_{side}" in t:
                return _mix(t[f"logits_{side}"], bank, k)
            return (t[f"topk_weights_{side}"].unsqueeze(-1) * bank[t[f"topk_indices_{side}"]]).sum(-2)

        a, b = mix("A"), mix("B")
        return b.transpose(1, 2).reshape(-1, b.shape[1]), a.reshape(a.shape[0], -1)

    def function_delta(self, entry: Entry, t: Tensors) -> torch.Tensor:
        b, a = self.factors(entry, t)
        return b @ a

    def forward(self, module: nn.Module, entry: Entry, t: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, a = self.factors(entry, t)
        return y + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)).to(y.dtype)


# ----- randlora (RandLoRA) -------------------------------------------------------------------------------------
class RandLora(af.WeightDeltaKind):
    """Shared random bases scaled by per-module ``lambda`` and ``gamma`` (spec 6.10.10)."""

    name = "randlora"
    required_roles = ("lambda", "gamma")

    def check(self, module: str, entry: Entry, shapes: Shapes) -> None:
        out, n_in = _matrix(module, entry)
        if set(entry.get("params", {}).get("shared", {})) != {"basis_A", "basis_B"}:
            raise _fail(module, "randlora needs params.shared naming the basis_A and basis_B tensors")
        lo, hi = min(out, n_in), max(out, n_in)
        lam, gam, a, b = shapes["lambda"], shapes["gamma"], shapes["basis_A"], shapes["basis_B"]
        if len(lam) != 2 or gam != (lam[1], lo):
            raise _fail(module, f"lambda {list(lam)} / gamma {list(gam)} must be [r, nb] / [nb, {lo}]")
        r, nb = lam
        if len(a) != 3 or a[0] != r or (a[1] != 1 and a[1] < nb) or a[2] < lo:
            raise _fail(module, f"shared basis_A {list(a)} must be [{r}, 1 or >= {nb}, >= {lo}]")
        if len(b) != 3 or b[0] < hi or b[1] < nb or b[2] != r:
            raise _fail(module, f"shared basis_B {list(b)} must be [>= {hi}, >= {nb}, {r}]")

    def rank(self, entry: Entry, shapes: Shapes) -> int:
        return shapes["lambda"][0] * shapes["lambda"][1]

    def param_count(self, entry: Entry, shapes: Shapes) -> int:
        return math.prod(shapes["lambda"]) + math.prod(shapes["gamma"])

    @staticmethod
    def factors(entry: Entry, t: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_B [max, r*nb], U_A [r*nb, min])``; ``dW_f`` is ``scale * U_B @ U_A`` or its transpose."""
        out, n_in = af.function_shape(entry)
        lo, hi = min(out, n_in), max(out, n_in)
        lam, gam = t["lambda"], t["gamma"]
        r, nb = lam.shape
        ua = (lam[:, :, None] * t["basis_A"][:, :nb, :lo] * gam[None]).reshape(r * nb, lo)
        ub = t["basis_B"][:hi, :nb, :].reshape(hi, nb * r)
        return ub, ua

    def function_delta(self, entry: Entry, t: Tensors) -> torch.Tensor:
        ub, ua = self.factors(entry, t)
        p = ub @ ua
        return self.scale(entry) * (p if p.shape[0] == af.function_shape(entry)[0] else p.t())

    def forward(self, module: nn.Module, entry: Entry, t: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return super().forward(module, entry, t, x, y)
        ub, ua = (f.to(x.dtype) for f in self.factors(entry, t))
        out, n_in = af.function_shape(entry)
        h = F.linear(F.linear(x, ua), ub) if n_in <= out else (x @ ub) @ ua
        return y + (self.scale(entry) * h).to(y.dtype)


# ----- circulant (C3A) -----------------------------------------------------------------------------------------
class Circulant(af.WeightDeltaKind):
    """Block ``(m, n)`` of ``dW_f`` is the circulant matrix ``C[p, q] = kernel[m, n, (q - p) mod b]`` (spec 6.10.11)."""

    name = "circulant"
    required_roles = ("kernel",)

    def check(self, module: str, entry: Entry, shapes: Shapes) -> None:
        out, n_in = _matrix(module, entry)
        k = shapes["kernel"]
        if len(k) != 3 or k[0] * k[2] != out or k[1] * k[2] != n_in:
            raise _fail(module, f"kernel {list(k)} must be [out/b, n_in/b, b] for [{out}, {n_in}]")

    def function_delta(self, entry: Entry, t: Tensors) -> torch.Tensor:
        w = t["kernel"]
        m, n, b = w.shape
        pos = torch.arange(b, device=w.device)
        blocks = w[:, :, (pos[None, :] - pos[:, None]) % b]  # [m, n, p, q]
        return self.scale(entry) * blocks.permute(0, 2, 1, 3).reshape(m * b, n * b)


# ----- block_share (MiSS / Bone) ---------------------------------------------------------------------------------
def _mode(entry: Entry) -> str:
    return entry.get("params", {}).get("mode", "tile")


class BlockShare(af.WeightDeltaKind):
    """MiSS: ``tile`` (additive, ``dW_f[o, i] = block[i mod r, o mod c]``) or ``bat`` (``W_blk (I + B) + B``
    per ``r x r`` block; depends on the weight, not additive) (spec 6.10.12)."""

    name = "block_share"
    required_roles = ("block",)

    def is_additive(self, entry: Entry, roles: Any) -> bool:
        return _mode(entry) == "tile"

    def acts_first(self, entry: Entry) -> bool:
        return _mode(entry) == "bat"  # it reads the module's own weight (spec 6.10.12)

    def check(self, module: str, entry: Entry, shapes: Shapes) -> None:
        out, n_in = _matrix(module, entry)
        b, mode = shapes["block"], _mode(entry)
        if mode == "tile":
            if len(b) != 2 or out % b[1]:
                raise _fail(module, f"a tile block {list(b)} must be 2-D [r, c] with c dividing {out}")
        elif mode == "bat":
            if len(b) != 3 or b[1] != b[2] or out % b[1] or n_in % b[1] or b[0] * b[1] != out:
                raise _fail(module, f"a bat block {list(b)} must be [out/r, r, r] with r dividing {out} and {n_in}")
        else:
            raise _fail(module, f"block_share params.mode must be 'tile' or 'bat', got {mode!r}")

    def function_delta(self, entry: Entry, t: Tensors) -> torch.Tensor:
        if _mode(entry) != "tile":
            raise af.UnsupportedError("block_share mode 'bat' depends on the weight; it has no additive delta")
        out, n_in = af.function_shape(entry)
        block = t["block"]
        r, c = block.shape
        return block[torch.arange(n_in) % r][:, torch.arange(out) % c].t()

    @staticmethod
    def bat_delta(weight_f: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """``dW_f`` of mode ``bat`` for the function-layout weight ``weight_f``."""
        out, n_in = weight_f.shape
        r = block.shape[-1]
        w = weight_f.to(block.dtype).reshape(out // r, r, n_in // r, r).permute(0, 2, 1, 3)
        d = w @ block[:, None] + block[:, None]
        return d.permute(0, 2, 1, 3).reshape(out, n_in)

    def forward(self, module: nn.Module, entry: Entry, t: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        block = t["block"]
        if _mode(entry) == "bat":
            w = module.weight.t() if self.transposed(entry) else module.weight
            dw = self.bat_delta(w, af.promoted(t)["block"]).to(y.dtype)
            return y + af.weight_function(module, x, dw)
        if not x.is_floating_point():
            return super().forward(module, entry, t, x, y)
        out = af.function_shape(entry)[0]
        r, c = block.shape
        pad = (-x.shape[-1]) % r
        xs = F.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, r).sum(-2)
        return y + (xs @ block.to(x.dtype).repeat(1, out // c)).to(y.dtype)

    def merge(self, module: nn.Module, entry: Entry, t: Tensors) -> Any:
        if _mode(entry) == "tile":
            return super().merge(module, entry, t)
        weight = module.weight
        saved = weight.detach().clone()
        with torch.no_grad():
            dw = self.bat_delta(weight.t() if self.transposed(entry) else weight, af.promoted(t)["block"])
            weight.add_((dw.t() if self.transposed(entry) else dw).to(weight.dtype))
        return saved

    def unmerge(self, module: nn.Module, entry: Entry, t: Tensors, state: Any) -> None:
        if _mode(entry) == "tile":
            return super().unmerge(module, entry, t, state)
        with torch.no_grad():
            module.weight.copy_(state)
        return None


# ----- methods --------------------------------------------------------------------------------------------------
def _schema(props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {**props, **af.TARGETS_SCHEMA}}


_INT = {"type": "integer", "minimum": 1}


def _fshape(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[1], w.shape[0]) if af.is_transposed(module) else (w.shape[0], w.shape[1])


def function_to_stored(flat: torch.Tensor, entry: Entry) -> torch.Tensor:
    """Flat row-major positions in the function layout ``[out, n_in]`` -> positions in the stored layout."""
    out, n_in = af.function_shape(entry)
    return flat % n_in * out + flat // n_in if entry.get("params", {}).get("transposed") else flat


class Shira(af.Method):
    name = "shira"
    summary = "SHiRA: a random sparse high-rank delta of r * (out + in) entries per module (kind sparse)"
    kinds = ("sparse",)
    config_schema = _schema({"r": _INT, "random_seed": {"type": "integer"}})

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Per module, ``r * (out + in)`` positions drawn as PEFT's random mask does (a permutation from a
        generator seeded with ``random_seed``); their values are trained from zero."""
        cfg = {"r": 32, "random_seed": 0, **config}
        self.check_config(cfg)

        def build(path: str, module: nn.Module) -> af.TrainableDelta:
            entry = af.module_entry("sparse", module, {"scale": 1.0})
            out, n_in = _fshape(module)
            k = cfg["r"] * (out + n_in)
            if k > out * n_in:
                raise af.FormatError(f"module {path!r}: r={cfg['r']} asks for {k} of its {out * n_in} weights")
            gen = torch.Generator().manual_seed(cfg["random_seed"])
            idx = function_to_stored(torch.randperm(out * n_in, generator=gen)[:k], entry).sort().values
            return af.TrainableDelta(entry, {"values": torch.zeros(k, dtype=af.adapter_dtype(module))},
                                     frozen={"indices": idx})

        return af.inject(model, method=self.name, config=cfg, build=build)


class LNTuning(af.Method):
    name = "ln_tuning"
    summary = "LN tuning: the targeted (norm) layers' own parameters trained, stored as dense replacements"
    kinds = ("dense",)
    config_schema = _schema({})

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Each targeted module's weight (and bias) becomes a trainable copy, starting at its value."""
        self.check_config(config)

        def build(path: str, module: nn.Module) -> af.TrainableDelta:
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                raise af.UnsupportedError(f"module {path!r} ({type(module).__name__}) has no weight to tune")
            params = {"value": weight.detach().clone()}
            if isinstance(getattr(module, "bias", None), torch.Tensor):
                params["bias_value"] = module.bias.detach().clone()
            entry = {"kind": "dense", "shape": list(weight.shape), "params": {"mode": "replace"}}
            return af.TrainableDelta(entry, params)

        return af.inject(model, method=self.name, config=config, build=build, supported=(nn.Module,))


class FourierFT(af.Method):
    name = "fourierft"
    summary = "FourierFT: n trained spectral coefficients per module, dW = scaling * Re(ifft2(spectrum))"
    kinds = ("fourier",)
    config_schema = _schema({"n_frequency": _INT, "scaling": {"type": "number"}, "random_loc_seed": {"type": "integer"}})

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Frequencies drawn as PEFT draws them (:meth:`frequencies`, at most ``out * in`` of them);
        coefficients trained from zero."""
        cfg = {"n_frequency": 1000, "scaling": 150.0, "random_loc_seed": 777, **config}
        self.check_config(cfg)

        def build(path: str, module: nn.Module) -> af.TrainableDelta:
            out, n_in = _fshape(module)
            n = min(cfg["n_frequency"], out * n_in)
            entry = af.module_entry("fourier", module, {"scale": float(cfg["scaling"])})
            return af.TrainableDelta(entry, {"spectrum": torch.zeros(n, dtype=af.adapter_dtype(module))},
                                     frozen={"indices": self.frequencies(out, n_in, n, cfg["random_loc_seed"])})

        return af.inject(model, method=self.name, config=cfg, build=build)

    @staticmethod
    def frequencies(out: int, n_in: int, n: int, seed: int) -> torch.Tensor:
        """The frequencies PEFT's FourierFT draws for an ``[out, n_in]`` weight: the first ``n`` of a random
        permutation of the flat positions, from a generator seeded with ``random_loc_seed``."""
        return torch.randperm(out * n_in, generator=torch.Generator().manual_seed(seed))[:n]


class VBLoRA(af.Method):
    name = "vblora"
    summary = "VB-LoRA: LoRA factors assembled from one trained vector bank by per-module top-k logits"
    kinds = ("vector_bank",)
    config_schema = _schema({"r": _INT, "num_vectors": _INT, "vector_length": _INT, "topk": _INT,
                             "init_vector_bank_bound": {"type": "number"}, "init_logits_std": {"type": "number"}})

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """One ``[num_vectors, vector_length]`` bank shared by every targeted module and trained with each
        module's logits (``[r, in / L, N]`` and ``[out / L, r, N]``), initialised as PEFT does: the bank uniform
        in ``+-init_vector_bank_bound``, the logits normal with std ``init_logits_std``. The forward mixes the
        top-k bank vectors by the softmax of their logits (spec 6.10.9), so gradients reach only those."""
        cfg = {"r": 4, "num_vectors": 256, "vector_length": 256, "topk": 2, "init_vector_bank_bound": 0.02,
               "init_logits_std": 0.1, **config}
        self.check_config(cfg)
        r, n, length, topk = cfg["r"], cfg["num_vectors"], cfg["vector_length"], cfg["topk"]
        if topk > n:
            raise af.UnsupportedError(f"vblora: topk={topk} exceeds num_vectors={n}")
        chosen = af.select_targets(model, cfg)
        dtype = af.adapter_dtype(next(iter(chosen.values()))) if chosen else torch.float32
        bound = float(cfg["init_vector_bank_bound"])
        bank = nn.Parameter(torch.empty(n, length, dtype=dtype).uniform_(-bound, bound))

        def build(path: str, module: nn.Module) -> af.TrainableDelta:
            out, n_in = _fshape(module)
            if out % length or n_in % length:
                raise af.UnsupportedError(f"module {path!r}: vector_length {length} must divide its {out} outputs "
                                          f"and {n_in} inputs")
            std = float(cfg["init_logits_std"])
            logits = {"logits_A": torch.empty(r, n_in // length, n, dtype=dtype).normal_(0, std),
                      "logits_B": torch.empty(out // length, r, n, dtype=dtype).normal_(0, std)}
            entry = af.module_entry("vector_bank", module, {"topk": topk})
            return af.TrainableDelta(entry, logits, shared={"vector_bank": ("vector_bank", bank)})

        return af.inject(model, method=self.name, config=cfg, build=build)


def randlora_bases(r: int, out_max: int, in_max: int, seed: int, *, sparse: bool = False,
                   very_sparse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared bases PEFT 0.21's RandLoRA draws for targeted layers of at most ``out_max`` outputs and
    ``in_max`` inputs (``lo``/``hi`` their min/max, ``nb = ceil(lo / r)``), from a CPU generator seeded with
    ``seed``: ``basis_A [r, 1, lo]`` and ``basis_B [hi, nb, r]``.

    Dense: bfloat16 Kaiming-uniform (``a = sqrt(5)``) draws, ``A`` first, then ``B`` as ``nb`` draws of
    ``[hi, 1, r]`` joined on axis 1, each divided by its standard deviation (in bfloat16, as PEFT on a CPU or a
    bf16-capable accelerator). ``sparse`` / ``very_sparse``: uniform draws ``u`` (float32) mapped to -1 below
    ``1 / 2s``, 1 above ``1 - 1 / 2s``, else 0 (``s`` = 3, or ``sqrt(lo)``), then divided by the std."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = min(out_max, in_max), max(out_max, in_max)
    nb = math.ceil(lo / r)
    if sparse or very_sparse:
        s = math.sqrt(lo) if very_sparse else 3
        u = torch.rand((r, 1, lo), generator=gen), torch.rand((hi, nb, r), generator=gen)
        a, b = ((t > 1 - 1 / (2 * s)).float() - (t < 1 / (2 * s)).float() for t in u)
    else:
        def draw(*shape: int) -> torch.Tensor:
            return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=gen)

        a = draw(r, 1, lo)
        b = torch.cat([draw(hi, 1, r) for _ in range(nb)], dim=1)
    return a / a.std(), b / b.std()


class RandLoRA(af.Method):
    name = "randlora"
    summary = "RandLoRA: full-rank updates from shared random bases and trained per-module diagonal scalings"
    kinds = ("randlora",)
    bases = staticmethod(randlora_bases)  # for format plugins, which reach it through the registry
    config_schema = _schema({"r": _INT, "randlora_alpha": {"type": "number"}, "projection_prng_key": {"type": "integer"}})

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Bases as PEFT draws them for the targeted layers (:func:`randlora_bases`); ``lambda`` starts at zero and
        ``gamma`` at ``1 / max(nb, min(out, in))`` as in PEFT; ``scale = randlora_alpha / r``."""
        cfg = {"r": 32, "randlora_alpha": 640, "projection_prng_key": 0, **config}
        self.check_config(cfg)
        chosen = af.select_targets(model, cfg)
        shapes = [_fshape(m) for m in chosen.values()]
        r = cfg["r"]
        a, b = randlora_bases(r, max(s[0] for s in shapes), max(s[1] for s in shapes), cfg["projection_prng_key"])

        def build(path: str, module: nn.Module) -> af.TrainableDelta:
            lo = min(_fshape(module))
            nb, dtype = math.ceil(lo / r), af.adapter_dtype(module)
            entry = af.module_entry("randlora", module, {"scale": cfg["randlora_alpha"] / r})
            params = {"lambda": torch.zeros(r, nb, dtype=dtype), "gamma": torch.full((nb, lo), 1 / max(nb, lo), dtype=dtype)}
            return af.TrainableDelta(entry, params, shared={"basis_A": ("basis_A", a.to(dtype)),
                                                            "basis_B": ("basis_B", b.to(dtype))})

        return af.inject(model, method=self.name, config=cfg, build=build)


class C3A(af.Method):
    name = "c3a"
    summary = "C3A: blocks of circulant matrices (first rows trained), dW = circ(kernel) / in_features"
    kinds = ("circulant",)
    config_schema = _schema({"block_size": _INT})

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Block size per module: the largest common divisor of ``block_size`` (default 256), ``out`` and
        ``in``; kernels trained from zero; ``scale = 1 / in`` as in PEFT."""
        cfg = {"block_size": 256, **config}
        self.check_config(cfg)

        def build(path: str, module: nn.Module) -> af.TrainableDelta:
            out, n_in = _fshape(module)
            b = math.gcd(cfg["block_size"], out, n_in)
            entry = af.module_entry("circulant", module, {"scale": 1 / n_in})
            return af.TrainableDelta(entry, {"kernel": torch.zeros(out // b, n_in // b, b, dtype=af.adapter_dtype(module))})

        return af.inject(model, method=self.name, config=cfg, build=build)


class MiSS(af.Method):
    name = "miss"
    summary = "MiSS (Bone): one shared block per module, tiled over the weight (or PEFT's 'bat' form)"
    kinds = ("block_share",)
    config_schema = _schema({"r": _INT, "mini_r": _INT, "variant": {"enum": ["miss", "mini", "bat"]}})

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """``variant`` ``miss`` (block ``[r, out]``), ``mini`` (``[r, mini_r]``) or ``bat`` (``[out/r, r, r]``),
        trained from zero."""
        cfg = {"r": 16, "variant": "miss", **config}
        self.check_config(cfg)
        r = cfg["r"]

        def build(path: str, module: nn.Module) -> af.TrainableDelta:
            out, _ = _fshape(module)
            variant, dtype = cfg["variant"], af.adapter_dtype(module)
            shape = {"miss": (r, out), "mini": (r, cfg.get("mini_r", out)), "bat": (out // r, r, r)}[variant]
            entry = af.module_entry("block_share", module, {"mode": "bat" if variant == "bat" else "tile"})
            af.registry.get_kind("block_share").check(path, entry, {"block": shape})
            return af.TrainableDelta(entry, {"block": torch.zeros(shape, dtype=dtype)})

        return af.inject(model, method=self.name, config=cfg, build=build)


@af.hookimpl
def adapterfmt_delta_kinds() -> list[af.DeltaKind]:
    return [Fourier(), VectorBank(), RandLora(), Circulant(), BlockShare()]


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [Shira(), LNTuning(), FourierFT(), VBLoRA(), RandLoRA(), C3A(), MiSS()]


__all__ = [
    "C3A",
    "BlockShare",
    "Circulant",
    "Fourier",
    "FourierFT",
    "LNTuning",
    "MiSS",
    "RandLoRA",
    "RandLora",
    "Shira",
    "VBLoRA",
    "VectorBank",
    "function_to_stored",
    "randlora_bases",
]
