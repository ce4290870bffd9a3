"""The torchtune format for ``adapter convert``: torchtune's own LoRA checkpoint (module names of torchtune's
Llama-style models), a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or the
``adapter_model.pt`` torchtune saves, read only with ``allow_pickle=True`` via ``torch.load(weights_only=True)``).

Keys: ``layers.<i>.attn.q_proj.lora_a.weight`` ``[r, in]`` and ``.lora_b.weight`` ``[out, r]``
(dW = lora_alpha / r * lora_b @ lora_a, one ``r`` and ``lora_alpha`` in the config). Module names map to
Hugging Face Llama names as torchtune's ``convert_weights`` does: ``layers.i.`` <-> ``model.layers.i.``,
``attn.{q,k,v}_proj`` <-> ``self_attn.{q,k,v}_proj``, ``attn.output_proj`` <-> ``self_attn.o_proj``,
``mlp.w1`` / ``w3`` / ``w2`` <-> ``mlp.gate_proj`` / ``up_proj`` / ``down_proj``, ``output`` <-> ``lm_head``.
torchtune permutes q/k rows into Meta's interleaved RoPE order when it loads a Hugging Face checkpoint
(``hf_to_tune``), so its q/k ``lora_b`` rows are in that order: reading undoes it, writing does it. The
head counts come from ``n_heads`` / ``n_kv_heads`` (CLI ``--n-heads`` / ``--n-kv-heads``), else from the
``config.json`` beside the checkpoint, else from the base's config. DoRA ``magnitude`` tensors are refused.

What torchtune 0.6's Hugging Face checkpointer writes into each ``epoch_<n>/``: ``adapter_model.pt``
(torchtune names), the same weights in PEFT names (``base_model.model.`` prefix, Hugging Face row order) as
``adapter_model.safetensors`` (``.bin`` without safe serialization), ``adapter_config.json`` (``r``,
``lora_alpha``, ``target_modules`` in Hugging Face names, ``peft_type``, and ``base_model_name_or_path``
when the repo id is known: recorded as the base name), and copies of the base's other files, among them
``config.json`` (``num_attention_heads``, ``num_key_value_heads``, ``hidden_size``, maybe ``head_dim``;
the head dimension must fit the q/k rows, as torchtune's own conversion needs). With the safetensors copy
present the folder is read by the ``peft`` codec; with only the pickles, by this one (``--allow-pickle``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

import adapterfmt as af

CONFIG_FILE = "adapter_config.json"
MODEL_CONFIG = "config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.pt"
RENAMES = (("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
           ("attn.v_proj", "self_attn.v_proj"), ("attn.output_proj", "self_attn.o_proj"),
           ("mlp.w1", "mlp.gate_proj"), ("mlp.w3", "mlp.up_proj"), ("mlp.w2", "mlp.down_proj"))
LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
NATIVE = re.compile(r"^(layers\.\d+\.|output\.)\S*lora_a\.weight$")
CONFIG_FIELDS = frozenset({"r", "lora_alpha", "target_modules", "peft_type", "base_model_name_or_path",
                           "lora_dropout", "use_dora",
                           "quantize_base", "lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output"})


def to_hf(module: str) -> str | None:
    """The Hugging Face Llama module path of a torchtune module path (None when unknown)."""
    if module == "output":
        return "lm_head"
    m = LAYER.match(module)
    rel = dict(RENAMES).get(m.group(2)) if m else None
    return f"model.layers.{m.group(1)}.{rel}" if rel else None


def from_hf(module: str) -> str | None:
    if module == "lm_head":
        return "output"
    m = HF_LAYER.match(module)
    rel = {hf: tt for tt, hf in RENAMES}.get(m.group(2)) if m else None
    return f"layers.{m.group(1)}.{rel}" if rel else None


def _heads(rows: dict[str, int], base: Any, n_heads: int | None, n_kv_heads: int | None,
           folder: Path | None = None) -> dict[str, int]:
    """Head counts of the q/k modules among ``rows`` (``{module: rows of lora_b}``): given, else from the
    ``config.json`` torchtune copies into ``folder`` (checked against the rows as torchtune's own
    conversion needs them to fit), else from the base's config."""
    qk = [m for m in rows if m.endswith(("self_attn.q_proj", "self_attn.k_proj"))]
    if not qk:
        return {}
    beside = folder / MODEL_CONFIG if folder is not None and n_heads is None else None
    if beside is not None and beside.is_file():
        n, kv = af.attention_heads(folder, None, n_kv_heads, why=f"{MODEL_CONFIG} has no num_attention_heads",
                                   path=beside)
        cfg = af.read_json_object(beside)
        hidden, head_dim = cfg.get("hidden_size"), cfg.get("head_dim")
        head_dim = head_dim if isinstance(head_dim, int) else hidden // n if isinstance(hidden, int) else None
        misfit = [f"{from_hf(m)} has {rows[m]}" for m in qk
                  if head_dim is not None and rows[m] != head_dim * (n if m.endswith("q_proj") else kv)]
        if misfit:
            raise af.FormatError(f"num_attention_heads={n}, num_key_value_heads={kv}, head dim {head_dim} do not fit "
                                 f"the q/k lora_b rows ({'; '.join(misfit)}): is this the model's config?", path=beside)
    else:
        n, kv = af.attention_heads(base, n_heads, n_kv_heads, path=folder,
                                   why="torchtune stores q/k rows in Meta's RoPE order"
                                   + (f" and there is no {MODEL_CONFIG} beside the checkpoint" if folder else ""))
    return {m: n if m.endswith("q_proj") else kv for m in qk}


def read_torchtune(path: str | Path, *, base: Any = None, allow_pickle: bool = False, n_heads: int | None = None,
                   n_kv_heads: int | None = None) -> af.Adapter:
    """Read a torchtune LoRA folder (see the module docstring)."""
    path = Path(path)
    cfg = af.read_json_object(path / CONFIG_FILE)
    odd = sorted(k for k, v in cfg.items() if k not in CONFIG_FIELDS and v not in (None, False, 0, 0.0, [], {}))
    if cfg.get("use_dora") or odd:
        raise af.UnsupportedError("torchtune config fields that cannot be represented: "
                                  + ", ".join(f"{k}={cfg[k]!r}" for k in (["use_dora"] if cfg.get("use_dora") else [])
                                              + odd), path=path)
    if (path / WEIGHTS_FILE).is_file():
        raw = af.read_tensor_file(path / WEIGHTS_FILE)[0]
    else:
        raw = af.read_pickle_tensors(path / PICKLE_FILE, allow_pickle=allow_pickle)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in raw.items():
        stem, _, role = key.removesuffix(".weight").rpartition(".")
        hf = to_hf(stem)
        if role in ("lora_a", "lora_b") and key.endswith(".weight") and hf:
            pairs.setdefault(hf, {})[role] = t
        else:
            unknown.append(key)
    unknown += [f"{from_hf(m)} (lora_a or lora_b missing)" for m, p in pairs.items() if len(p) != 2]
    if unknown:
        raise af.UnsupportedError("torchtune tensors this converter cannot place: " + ", ".join(sorted(unknown)),
                                  path=path)
    r, alpha = int(cfg.get("r", 0)), cfg.get("lora_alpha")
    bad = sorted(m for m, p in pairs.items() if p["lora_a"].shape[0] != r)
    if bad or alpha is None:
        raise af.FormatError(f"config r={r}, lora_alpha={alpha!r} do not fit the tensors ({', '.join(bad)})",
                             path=path)
    heads = _heads({m: p["lora_b"].shape[0] for m, p in pairs.items()}, base, n_heads, n_kv_heads, path)
    factors = {m: (p["lora_a"], af.rope_permute(p["lora_b"], heads[m], inverse=True) if m in heads else p["lora_b"],
                   af.lora_scale(alpha, r)) for m, p in pairs.items()}
    prov = {"tool": "torchtune", "format": "torchtune", "source": str(path), "config": cfg}
    return af.lowrank_adapter(factors, config={"r": r, "alpha": alpha}, provenance=prov, base=base, path=path,
                              base_name=cfg.get("base_model_name_or_path"))


def write_torchtune(adapter: af.Adapter, path: str | Path, *, base: Any = None, n_heads: int | None = None,
                    n_kv_heads: int | None = None) -> Path:
    """Write ``adapter`` (plain LoRA on Llama linear layers, one rank and alpha) as a torchtune folder."""
    path = Path(path)
    factors = af.lowrank_factors(adapter, "torchtune", conv=False)
    names = {m: from_hf(m) for m in factors}
    unnamed = sorted(m for m, n in names.items() if n is None)
    if unnamed:
        raise af.UnsupportedError("modules with no torchtune Llama name: " + ", ".join(unnamed))
    rank = af.one_value({m: a.shape[0] for m, (a, _, _) in factors.items()}, "torchtune", "LoRA rank")
    alpha = af.one_value({m: af.alpha_for(s, rank) for m, (_, _, s) in factors.items()}, "torchtune", "LoRA alpha")
    heads = _heads({m: b.shape[0] for m, (_, b, _) in factors.items()}, base, n_heads, n_kv_heads)
    tensors = {}
    for m, (a, b, _) in factors.items():
        tensors[f"{names[m]}.lora_a.weight"] = a
        tensors[f"{names[m]}.lora_b.weight"] = af.rope_permute(b, heads[m]) if m in heads else b
    src = next((p.get("config") for p in reversed(adapter.manifest.get("provenance", []))
                if p.get("format") == "torchtune"), None) or {}
    targets = sorted({m.rsplit(".", 1)[-1] for m in factors})
    cfg = {**src, "r": rank, "lora_alpha": alpha, "peft_type": "LORA",
           "target_modules": src["target_modules"] if sorted(src.get("target_modules") or []) == targets else targets}
    return af.write_folder(path, WEIGHTS_FILE, tensors, CONFIG_FILE, cfg)


class TorchtuneFormat:
    """The ``torchtune`` codec (:class:`adapterfmt.ForeignFormat`)."""

    name = "torchtune"
    summary = "torchtune LoRA folder: adapter_config.json + adapter_model.safetensors/.pt with torchtune names"
    detect_priority = 1  # narrower than PEFT's detect (same config file name): asked first

    def detect(self, path: Path) -> bool:
        if not path.is_dir() or not (path / CONFIG_FILE).is_file():
            return False
        if (path / WEIGHTS_FILE).is_file():
            return any(NATIVE.match(n) for n in af.tensor_names(path / WEIGHTS_FILE))
        return (path / PICKLE_FILE).is_file()

    def read(self, path: Path, **options: Any) -> af.Adapter:
        return read_torchtune(path, **{k: options[k] for k in ("base", "allow_pickle", "n_heads", "n_kv_heads")
                                       if options.get(k) is not None})

    def write(self, adapter: af.Adapter, path: Path, **options: Any) -> None:
        write_torchtune(adapter, path, **{k: options.get(k) for k in ("base", "n_heads", "n_kv_heads")})


@af.hookimpl
def adapterfmt_formats() -> list[Any]:
    return [TorchtuneFormat()]
