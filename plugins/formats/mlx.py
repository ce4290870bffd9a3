"""The mlx-lm format for ``adapter convert``: a folder with ``adapters.safetensors`` + ``adapter_config.json``.

mlx-lm (``mlx_lm/tuner/lora.py``) stores, for a linear layer with weight ``[out, in]``, ``<module>.lora_a``
``[in, r]`` and ``<module>.lora_b`` ``[r, out]``, and computes ``y = W x + scale * (x @ lora_a) @ lora_b``,
so dW = scale * (lora_a @ lora_b).T: the factors are PEFT's transposed (``A = lora_a.T``, ``B = lora_b.T``)
and ``lora_parameters.scale`` multiplies directly (no ``alpha / r``). An embedding stores ``lora_a``
``[vocab, r]``, ``lora_b`` ``[r, dim]`` with dW = scale * lora_a @ lora_b, which is the same transpose of
adapterfmt's embedding factors. Module paths are the model's parameter paths (``model.layers.0.self_attn.q_proj``).

Shapes cannot tell an embedding from a linear layer (``[vocab, r]`` / ``[r, dim]`` against ``[in, r]`` /
``[r, out]``, the same when vocab equals dim), so a module is an embedding when the live ``base`` says so
(``nn.Embedding``), or else by its name (``embed_tokens``, ``wte`` ...). On a base that ties its output head to
the input embedding, mlx-lm applies an embedding LoRA to the head as well (``LoRAEmbedding.as_linear``), which
an adapterfmt or PEFT embedding entry does not: such an adapter is refused, and reading an embedding LoRA
needs the base (a live module, or a checkpoint whose ``config.json`` gives ``tie_word_embeddings``).

One rank and one scale serve the whole adapter (``lora_parameters.rank`` / ``scale``); writing an adapter
whose modules differ in either is an error naming them. ``fine_tune_type`` other than ``lora`` (DoRA,
full fine-tuning) cannot be read. Written configs use ``num_layers = -1`` (all layers) and ``keys`` naming
the adapted modules relative to their layer, so mlx-lm builds LoRA layers exactly where tensors exist
(other layers with those keys get zero-initialised ``lora_b``, which changes nothing).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adapterfmt as af

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
LAYER = re.compile(r"^(?:.*\.)?layers\.\d+\.(.+)$")
KNOWN_FIELDS = frozenset({"fine_tune_type", "num_layers", "lora_parameters"})
LORA_FIELDS = frozenset({"rank", "scale", "dropout", "keys", "alpha"})
EMBEDDING_NAMES = frozenset({"embed_tokens", "wte", "wpe", "tok_embeddings", "word_embeddings", "embed_in",
                             "embeddings", "embedding"})
"""Last path components of the embedding modules in mlx-lm's models (used without a live base)."""


def _config(path: Path) -> dict[str, Any]:
    cfg = af.read_json_object(path / CONFIG_FILE)
    if not isinstance(cfg.get("lora_parameters"), dict):
        raise af.FormatError(f"{CONFIG_FILE} has no lora_parameters object", path=path)
    return cfg


def read_mlx(path: str | Path, *, base: Any = None) -> af.Adapter:
    """Read an mlx-lm LoRA adapter folder (see the module docstring for the mapping)."""
    path = Path(path)
    cfg = _config(path)
    lp = cfg["lora_parameters"]
    if cfg.get("fine_tune_type", "lora") != "lora":
        raise af.UnsupportedError(f"mlx-lm fine_tune_type={cfg['fine_tune_type']!r} cannot be read (only 'lora')",
                                  path=path)
    if "scale" not in lp:
        raise af.FormatError("lora_parameters has no scale (mlx-lm multiplies the LoRA product by scale; "
                             "alpha is not used)", path=path)
    tensors, _ = af.read_tensor_file(path / WEIGHTS_FILE)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        module, _, role = key.rpartition(".")
        if role in ("lora_a", "lora_b") and t.dim() == 2:
            pairs.setdefault(module, {})[role] = t
        else:
            unknown.append(key)
    incomplete = sorted(m for m, p in pairs.items() if len(p) != 2)
    if unknown or incomplete:
        raise af.UnsupportedError("mlx-lm tensors this converter cannot place: "
                                  + ", ".join(sorted(unknown) + [f"{m} (lora_a or lora_b missing)" for m in incomplete]),
                                  path=path)
    rank, scale = int(lp.get("rank", 0)), float(lp["scale"])
    bad = sorted(m for m, p in pairs.items() if p["lora_a"].shape[1] != rank or p["lora_b"].shape[0] != rank)
    if bad:
        raise af.FormatError(f"lora_parameters.rank is {rank} but these modules have another rank: {', '.join(bad)}",
                             path=path)
    factors = {m: (p["lora_a"].t().contiguous(), p["lora_b"].t().contiguous(), scale) for m, p in pairs.items()}
    embeddings = _embeddings(list(pairs), base, path)
    prov = {"tool": "mlx-lm", "format": "mlx", "source": str(path), "config": cfg}
    return af.lowrank_adapter(factors, config={"r": rank, "scale": scale}, provenance=prov, base=base,
                              embeddings=embeddings, path=path)


def _embeddings(modules: list[str], base: Any, path: Path) -> set[str]:
    """The embedding modules among ``modules``; refused where the base ties one to its output head."""
    if isinstance(base, nn.Module):
        subs = dict(base.named_modules())
        found = {m for m in modules if isinstance(subs.get(m), nn.Embedding)}
        weights = [w for _, w in base.named_parameters(remove_duplicate=False)]
        tied = sorted(m for m in found if sum(w is subs[m].weight for w in weights) > 1)
    else:
        found = {m for m in modules if m.rsplit(".", 1)[-1] in EMBEDDING_NAMES}
        tie = af.base_config(base).get("tie_word_embeddings") if base is not None else None
        if found and not isinstance(tie, bool):
            raise af.UnsupportedError(f"mlx-lm LoRA on embedding {', '.join(sorted(found))}: mlx-lm also applies it to "
                                      "the output head when the base ties word embeddings; pass the base (--base, "
                                      "with a config.json giving tie_word_embeddings) to tell", path=path)
        tied = sorted(found) if tie else []
    if tied:
        raise af.UnsupportedError(f"mlx-lm LoRA on embedding {', '.join(tied)} of a base with tie_word_embeddings: "
                                  "mlx-lm applies it to the output head too (LoRAEmbedding.as_linear), which "
                                  "adapterfmt and PEFT embedding LoRA do not", path=path)
    return found


def write_mlx(adapter: af.Adapter, path: str | Path) -> Path:
    """Write ``adapter`` (plain LoRA on 2-D weights, one rank, one scale) as an mlx-lm adapter folder."""
    path = Path(path)
    factors = af.lowrank_factors(adapter, "mlx-lm", conv=False)
    if not factors:
        raise af.UnsupportedError("the adapter has no LoRA modules to write")
    rank = af.one_value({m: a.shape[0] for m, (a, _, _) in factors.items()}, "mlx-lm", "LoRA rank")
    scale = af.one_value({m: s for m, (_, _, s) in factors.items()}, "mlx-lm", "LoRA scale")
    tensors = {}
    for m, (a, b, _) in factors.items():
        tensors[f"{m}.lora_a"] = a.t()
        tensors[f"{m}.lora_b"] = b.t()
    keys = sorted({(LAYER.match(m) or re.match(r"(.+)", m)).group(1) for m in factors})
    src = next((p.get("config") for p in reversed(adapter.manifest.get("provenance", [])) if p.get("format") == "mlx"),
               None) or {}
    lp = {"rank": rank, "scale": scale,
          "dropout": src.get("lora_parameters", {}).get("dropout", 0.0), "keys": keys}
    cfg = {**{k: v for k, v in src.items() if k not in KNOWN_FIELDS}, "fine_tune_type": "lora", "num_layers": -1,
           "lora_parameters": lp}
    return af.write_folder(path, WEIGHTS_FILE, tensors, CONFIG_FILE, cfg)


class MlxFormat:
    """The ``mlx`` codec (:class:`adapterfmt.ForeignFormat`)."""

    name = "mlx"
    summary = "mlx-lm LoRA folder: adapters.safetensors (lora_a [in, r], lora_b [r, out]) + adapter_config.json"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()

    def read(self, path: Path, **options: Any) -> af.Adapter:
        return read_mlx(path, base=options.get("base"))

    def write(self, adapter: af.Adapter, path: Path, **options: Any) -> None:
        write_mlx(adapter, path)


@af.hookimpl
def adapterfmt_formats() -> list[Any]:
    return [MlxFormat()]
