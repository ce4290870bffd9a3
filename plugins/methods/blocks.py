"""Dense sub-blocks of weights: the ``block`` kind, S2FT and HFT.

Kind ``block`` (spec 6.10.6): whole rows or columns of a 2-D weight in function layout ``[out, n_in]``.
Roles ``indices`` (int64 ``[n]``, strictly increasing) and ``block`` (``[n, n_in]`` for ``params.axis = "rows"``,
``[out, n]`` for ``"columns"``); ``dW_f[indices[j], :] = scale * block[j, :]`` (rows) or
``dW_f[:, indices[j]] = scale * block[:, j]`` (columns); ``params.transposed`` marks a target stored ``[in, out]``.
Additive. Unmerged on a linear map no weight-sized tensor is formed (``af.block_apply``: a Triton kernel on CUDA,
torch elsewhere): rows are one GEMM on ``x`` whose ``n`` outputs are added at ``indices``, columns gather ``n``
input features and run one GEMM. Merge and unmerge touch only the block's rows / columns. Against ``sparse`` for
the same delta: one int64 index per row or column instead of one per value, about a third of the bytes at fp32.

Methods:

- ``s2ft`` (Yang et al., NeurIPS 2024): per role a ratio of units — attention heads for ``v_proj`` rows
  (``v_ratio``) and ``o_proj`` columns (``o_ratio``), intermediate channels for ``up_proj`` rows (``u_ratio``)
  and ``down_proj`` columns (``d_ratio``) — drawn as the authors' script draws them: ``int(units * layers *
  ratio)`` units at once over all layers (so per-layer counts vary), one seeded draw per role. The default
  is the authors' released recipe (``d_ratio = 0.03``, the others 0, independent draws). ``coupled: true``
  shares one draw between the matrices that share the units (v rows with o columns, up rows with down
  columns; the two ratios of a pair must then be equal or one of them 0). The authors train in a permuted
  layout and fuse the result; here the blocks are trained in place (gather / scatter by sorted indices), the
  same function, and stored as ``block`` entries.
- ``hft`` (Hui et al., half fine-tuning): in each transformer block a seeded half of the matrices is trained
  fully (``dense`` add entries), the other half frozen. Rule used (the paper's category-level choice as read in
  design notes; the odd FFN count is our choice): of ``q, k, v, o`` ``round(ratio * 4)`` at random; of
  ``gate, up, down`` ``floor(ratio * 3)`` in even blocks and ``ceil(ratio * 3)`` in odd ones. The draw of a
  block uses ``random.Random(f"{seed}:{stage}:{block}")``; a new ``stage`` (continual round) re-draws.
"""

from __future__ import annotations

import copy
import math
import random
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

import adapterfmt as af

AXES = ("rows", "columns")


def _fail(module: str, msg: str) -> af.FormatError:
    return af.FormatError(f"module {module!r}: {msg}")


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and module.weight.dim() == 2)


class Block(af.DeltaKind):
    name = "block"
    required_roles = ("indices", "block")
    layout_sensitive = True

    def check(self, module: str, entry: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
        axis = entry.get("params", {}).get("axis")
        if axis not in AXES:
            raise _fail(module, f"block needs params.axis 'rows' or 'columns', got {axis!r}")
        fshape = af.function_shape(entry)
        if len(fshape) != 2:
            raise _fail(module, f"block adapts 2-D weights, shape is {list(entry['shape'])}")
        out_f, in_f = fshape
        i, b = shapes["indices"], shapes["block"]
        want = (i[0], in_f) if axis == "rows" else (out_f, i[0]) if len(i) == 1 else None
        if len(i) != 1 or b != want or i[0] > (out_f if axis == "rows" else in_f):
            form = f"[n, {in_f}]" if axis == "rows" else f"[{out_f}, n]"
            raise _fail(module, f"block with axis {axis} needs indices [n] and block {form}, got {list(i)}, {list(b)}")

    def check_data(self, module: str, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> None:
        idx, axis = t["indices"], entry["params"]["axis"]
        limit = af.function_shape(entry)[0 if axis == "rows" else 1]
        if idx.dtype != torch.int64:
            raise _fail(module, f"block indices must be int64, got {idx.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
            raise _fail(module, f"block indices out of range [0, {limit}) for axis {axis}")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise _fail(module, "block indices must be strictly increasing")

    def param_count(self, entry: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> int:
        return math.prod(shapes["block"])

    @staticmethod
    def scale(entry: Mapping[str, Any]) -> float:
        return float(entry.get("params", {}).get("scale", 1.0))

    def function_delta(self, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        blk = t["block"].to(torch.promote_types(t["block"].dtype, torch.float32))
        d = torch.zeros(af.function_shape(entry), dtype=blk.dtype, device=blk.device)
        if entry["params"]["axis"] == "rows":
            d[t["indices"]] = self.scale(entry) * blk
        else:
            d[:, t["indices"]] = self.scale(entry) * blk
        return d

    def delta(self, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        d = self.function_delta(entry, t)
        return d.t() if self.transposed(entry) else d

    def forward(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        if not _linear_like(module):  # an embedding: through its function with dW_f
            return y + af.weight_function(module, x, self.function_delta(entry, t).to(y.dtype))
        return af.block_apply(x, y, t["indices"], t["block"].to(x.dtype), self.scale(entry), entry["params"]["axis"])

    def _add(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor], sign: float) -> None:
        """``W += sign * dW`` touching only the block's rows / columns (summed in at least fp32, rounded once)."""
        param = getattr(module, entry.get("parameter", "weight"))
        acc = torch.promote_types(param.dtype, torch.float32)
        idx = t["indices"].to(param.device)
        blk = sign * self.scale(entry) * t["block"].to(device=param.device, dtype=acc)
        rows = (entry["params"]["axis"] == "rows") != self.transposed(entry)  # a function row is a stored column when transposed
        blk = blk.t() if self.transposed(entry) else blk
        with torch.no_grad():
            if rows:
                param[idx] = (param[idx].to(acc) + blk).to(param.dtype)
            else:
                param[:, idx] = (param[:, idx].to(acc) + blk).to(param.dtype)

    def merge(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> Any:
        self._add(module, entry, t, 1.0)

    def unmerge(self, module: nn.Module, entry: Mapping[str, Any], t: Mapping[str, torch.Tensor], state: Any) -> None:
        self._add(module, entry, t, -1.0)


def block_trainable(module: nn.Module, axis: str, indices: torch.Tensor) -> af.TrainableDelta:
    """A trainable ``block`` entry (zeros) on the function-layout rows / columns ``indices`` of ``module``."""
    entry = af.module_entry("block", module, {"axis": axis, "scale": 1.0})
    out_f, in_f = af.function_shape(entry)
    shape = (indices.numel(), in_f) if axis == "rows" else (out_f, indices.numel())
    return af.TrainableDelta(entry, {"block": torch.zeros(shape, dtype=af.adapter_dtype(module))},
                             frozen={"indices": indices})


# ----- S2FT -------------------------------------------------------------------------------------------------
ROLES = {"v_ratio": ("v_proj", "rows", "heads"), "o_ratio": ("o_proj", "columns", "heads"),
         "u_ratio": ("up_proj", "rows", "channels"), "d_ratio": ("down_proj", "columns", "channels")}
"""S2FT's ratios: which projection, which axis of it, and which units (attention heads or FFN channels)."""
PAIRS = (("v_ratio", "o_ratio"), ("u_ratio", "d_ratio"))
LAYER = re.compile(r"\.(\d+)\.")


def s2ft_draw(num_layers: int, units: int, ratio: float, rng: random.Random) -> dict[int, list[int]]:
    """The authors' draw: ``int(units * layers * ratio)`` units sampled without replacement over all layers
    at once, per layer in increasing order."""
    picked = sorted(rng.sample(range(units * num_layers), int(units * num_layers * ratio)))
    per_layer: dict[int, list[int]] = {i: [] for i in range(num_layers)}
    for u in picked:
        per_layer[u // units].append(u % units)
    return per_layer


def _by_layer(model: nn.Module, suffix: str) -> dict[int, tuple[str, nn.Module]]:
    found = {}
    for path, m in model.named_modules():
        layer = LAYER.search(path)
        if path.rsplit(".", 1)[-1] == suffix and layer and _linear_like(m):
            found[int(layer.group(1))] = (path, m)
    return found


class S2FT(af.Method):
    name = "s2ft"
    summary = "S2FT: a few attention heads and FFN channels per block trained as dense rows / columns (kind block)"
    kinds = ("block",)
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {
        **{r: {"type": "number", "minimum": 0, "maximum": 1} for r in ROLES},
        "coupled": {"type": "boolean"}, "seed": {"type": "integer"}, "num_heads": {"type": "integer", "minimum": 1}}}
    DEFAULTS: ClassVar[dict[str, Any]] = {"v_ratio": 0.0, "o_ratio": 0.0, "u_ratio": 0.0, "d_ratio": 0.03,
                                          "coupled": False, "seed": 0}

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        """Draw the units (module docstring) and inject zero ``block`` trainables on the chosen rows / columns."""
        self.check_config(config)
        given = set(config) & set(ROLES)
        cfg = {**self.DEFAULTS, **({r: 0.0 for r in ROLES} if given else {}), **config}
        units_of = self._unit_indices(model, cfg)
        chosen = {path: (axis, idx) for path, axis, idx in units_of if idx.numel()}
        if not chosen:
            raise af.FormatError("s2ft: the ratios select no unit; raise v_ratio / o_ratio / u_ratio / d_ratio")
        return af.inject(model, method=self.name, config=cfg, targets={"target_modules": sorted(chosen)},
                         build=lambda path, m: block_trainable(m, *chosen[path]))

    def conformance_example(self) -> Any:
        """The conformance kit's example: ratios that pick units on its tiny model (the default recipe's 3% of
        32 channels is none), coupled, trained blocks perturbed away from zero."""
        from adapterfmt.authoring.conformance import Example
        from adapterfmt.tiny import TinyConfig, build_tiny

        model = build_tiny(0, TinyConfig(vocab_size=32, hidden=16, layers=2, heads=2, intermediate=32))
        config = {"v_ratio": 0.5, "o_ratio": 0.5, "u_ratio": 0.25, "d_ratio": 0.25, "coupled": True}
        session = self.train(copy.deepcopy(model), config=config)
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in session.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        adapter = session.extract()
        session.remove()
        return Example(model, adapter, torch.randint(0, 32, (3, 5), generator=gen), train_config=config)

    def _unit_indices(self, model: nn.Module, cfg: dict[str, Any]) -> list[tuple[str, str, torch.Tensor]]:
        rng = random.Random(cfg["seed"])
        n_heads = cfg.get("num_heads") or af.base_config(model).get("heads")
        n_heads = af.attention_heads(model, n_heads, why="s2ft")[0]
        out: list[tuple[str, str, torch.Tensor]] = []
        draws: dict[str, dict[int, list[int]]] = {}
        counts: dict[str, int] = {}
        for key, (suffix, axis, kind) in ROLES.items():
            mods = _by_layer(model, suffix)
            if not mods or not cfg[key]:
                continue
            hidden = _by_layer(model, "o_proj")
            head_dim = next(iter(hidden.values()))[1].weight.shape[0] // n_heads if hidden else 1
            size = af.function_shape(af.module_entry("block", next(iter(mods.values()))[1]))
            width = size[0] if axis == "rows" else size[1]
            units, per = (width // head_dim, head_dim) if kind == "heads" else (width, 1)
            partner = next((a for a, b in PAIRS if b == key), None)
            if cfg["coupled"] and partner and cfg[partner]:
                if cfg[partner] != cfg[key]:
                    raise af.FormatError(f"s2ft: coupled needs {partner} == {key} (or one of them 0)")
                if counts[partner] != units:
                    raise af.FormatError(f"s2ft: coupled {partner} and {key} count {counts[partner]} and {units} "
                                         "units per layer (grouped-query attention); use coupled: false")
                draw = draws[partner]
            else:
                draw = s2ft_draw(max(mods) + 1, units, cfg[key], rng)
            draws[key], counts[key] = draw, units
            for layer, (path, _) in mods.items():
                idx = torch.tensor(sorted(u * per + j for u in draw.get(layer, []) for j in range(per)),
                                   dtype=torch.int64)
                out.append((path, axis, idx))
        return out


# ----- HFT --------------------------------------------------------------------------------------------------
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")


def hft_choice(block: int, seed: int, stage: int, ratio: float) -> list[str]:
    """The projections of transformer block ``block`` that HFT trains in this ``stage`` (module docstring)."""
    rng = random.Random(f"{seed}:{stage}:{block}")
    n_ffn = math.floor(ratio * 3) if block % 2 == 0 else math.ceil(ratio * 3)
    return sorted(rng.sample(ATTN, round(ratio * 4)) + rng.sample(FFN, n_ffn))


def dense_trainable(module: nn.Module) -> af.TrainableDelta:
    entry = {"kind": "dense", "shape": list(module.weight.shape), "params": {"mode": "add"}}
    return af.TrainableDelta(entry, {"delta": torch.zeros(module.weight.shape, dtype=af.adapter_dtype(module))})


class HFT(af.Method):
    name = "hft"
    summary = "Half fine-tuning: a seeded half of each block's matrices trained fully (kind dense), the rest frozen"
    kinds = ("dense",)
    config_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {
        "ratio": {"type": "number", "minimum": 0, "maximum": 1}, "seed": {"type": "integer"},
        "stage": {"type": "integer", "minimum": 0}}}

    def train(self, model: nn.Module, *, config: dict[str, Any], **options: Any) -> af.TrainSession:
        self.check_config(config)
        cfg = {"ratio": 0.5, "seed": 0, "stage": 0, **config}
        chosen = []
        for path, m in model.named_modules():
            layer, leaf = LAYER.search(path), path.rsplit(".", 1)[-1]
            if layer and leaf in ATTN + FFN and _linear_like(m) and \
                    leaf in hft_choice(int(layer.group(1)), cfg["seed"], cfg["stage"], cfg["ratio"]):
                chosen.append(path)
        if not chosen:
            raise af.FormatError("hft: no q/k/v/o or gate/up/down projection of a numbered block is chosen")
        return af.inject(model, method=self.name, config=cfg, targets={"target_modules": chosen},
                         build=lambda path, m: dense_trainable(m))


@af.hookimpl
def adapterfmt_delta_kinds() -> list[af.DeltaKind]:
    return [Block()]


@af.hookimpl
def adapterfmt_methods() -> list[af.Method]:
    return [S2FT(), HFT()]


__all__ = ["HFT", "S2FT", "Block", "block_trainable", "hft_choice", "s2ft_draw"]
