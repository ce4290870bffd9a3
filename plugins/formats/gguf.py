"""The GGUF format (llama.cpp LoRA adapters) for ``adapter convert``, through the ``gguf`` package.

A llama.cpp LoRA is one ``.gguf`` file with ``general.type = "adapter"``, ``adapter.type = "lora"``,
``general.architecture`` (the base's) and one ``adapter.lora.alpha`` for the whole file, and tensors
``<llama.cpp tensor name>.weight.lora_a`` / ``.lora_b`` (``blk.0.attn_q.weight.lora_a`` ...). GGUF lists
dimensions innermost first (ggml's ``ne``); in row-major (numpy / torch) order ``lora_a`` is ``[r, in]``
and ``lora_b`` ``[out, r]`` — PEFT's layout — except ``token_embd``, whose ``lora_a`` is stored transposed
(``[vocab, r]``); the name says it is an embedding, so it is read as one whatever the shapes. llama.cpp scales
each pair by ``alpha / r`` (r = ``lora_b``'s inner dimension), or by 1 when alpha is 0. An aLoRA
(``adapter.alora.invocation_tokens``: active only after those tokens) is refused, as in the PEFT codec.
``general.name`` is the adapter's own name; it and ``adapter.lora.task_name`` / ``prompt_prefix`` are kept
in provenance and written back to GGUF (other formats have no place for them). The base is
``general.base_model.0.*``: its ``repo_url`` (a Hugging Face URL gives the repository id) or ``name`` is read
as the base's name; writing gives the source's keys again, or ``name`` alone for another base.

Module names map through gguf's own ``TensorNameMap`` for the architecture (as llama.cpp's
``convert_lora_to_gguf.py`` does); reading maps back onto the base model's module names (``base=``) or,
without a base, onto Hugging Face Llama names. For ``llama``, llama.cpp's converter reorders the output
rows of q and k for its interleaved RoPE (``permute`` in ``convert_hf_to_gguf.py``), which for a LoRA
reorders the rows of ``lora_b``: reading undoes it and writing does it, with the head counts from
``n_heads`` / ``n_kv_heads`` or the base's config; ``qwen2`` / ``qwen3`` (NeoX RoPE) are not permuted.
Writing takes the architecture from ``arch=``, else the GGUF file the adapter came from, else the base's
``model_type`` (:data:`MODEL_TYPES`); other architectures are refused. f32, f16 and bf16 tensors are read
exactly (bf16 is written as bf16); quantized adapters are refused. Any failure of the gguf reader (a
truncated or corrupt file) is a :class:`adapterfmt.FormatError` naming the file. One alpha per file: an
adapter whose modules need different alphas (``scale * r`` differs) is refused, naming them, unless every
scale is 1 (alpha 0).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

import adapterfmt as af

ARCHS = {"llama": True, "qwen2": False, "qwen3": False}
"""Architectures whose q/k row order is known: True where llama.cpp's converter permutes it for RoPE."""
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
"""Hugging Face ``model_type`` -> llama.cpp architecture (as ``convert_hf_to_gguf.py`` registers them)."""
FLOAT_TYPES = ("F32", "F16", "BF16")
HF_URL = "https://huggingface.co/"
EMBEDDING = "token_embd"
LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise af.UnsupportedError("GGUF needs the gguf package (pip install 'adapterfmt[gguf]')") from None
    return gguf


def _arch(gguf: Any, name: str, path: object = None) -> Any:
    if name not in ARCHS:
        raise af.UnsupportedError(f"GGUF architecture {name!r}: q/k row order not verified (supported: "
                                  f"{', '.join(ARCHS)})", path=path)
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == name)


def _source(adapter: af.Adapter) -> dict[str, Any]:
    """The provenance record of the GGUF file the adapter was read from (empty if none)."""
    return next((p for p in reversed(adapter.manifest.get("provenance", [])) if p.get("format") == "gguf"), {})


def _write_arch(adapter: af.Adapter, arch: str | None, base: Any) -> str:
    """The llama.cpp architecture to write: given, from the GGUF source, or from the base's model_type."""
    src = _source(adapter)
    if arch or src.get("architecture"):
        return str(arch or src["architecture"])
    model_type = af.base_config(base).get("model_type")
    if model_type is None:
        raise af.UnsupportedError("GGUF records the base's architecture: pass --arch (arch=; one of "
                                  f"{', '.join(ARCHS)}) or a --base whose config.json gives model_type")
    if model_type not in MODEL_TYPES:
        raise af.UnsupportedError(f"base model_type {model_type!r} has no verified llama.cpp architecture "
                                  f"(known: {', '.join(sorted(MODEL_TYPES))}); pass --arch to name one")
    return MODEL_TYPES[model_type]


def _open(gguf: Any, path: Path) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
    """The reader, its key/values and its tensors; whatever the gguf reader raises (a truncated or
    corrupt file) becomes one FormatError naming the file."""
    try:
        reader = gguf.GGUFReader(path)
        kv = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
        tensors = {t.name: _tensor(t, reader.byte_order) for t in reader.tensors
                   if t.tensor_type.name in FLOAT_TYPES}
    except af.AdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - the gguf reader raises ValueError, IndexError, struct errors ...
        raise af.FormatError(f"not a readable GGUF file ({type(e).__name__}: {e})", path=path) from None
    return reader, kv, tensors


def _tensor(t: Any, byte_order: str) -> torch.Tensor:
    if t.tensor_type.name != "BF16":
        return torch.from_numpy(np.array(t.data))
    # the reader hands bf16 over as raw bytes [rows, 2 * cols]
    u16 = np.dtype(np.uint16).newbyteorder("S" if byte_order == "S" else "=")
    return torch.from_numpy(np.ascontiguousarray(t.data).view(u16).astype(np.uint16).view(np.int16)).view(
        torch.bfloat16)


def _base_name(gguf: Any, kv: dict[str, Any]) -> str | None:
    """The first base model's Hugging Face id (from its repo_url), else its name."""
    url = kv.get(gguf.Keys.General.BASE_MODEL_REPO_URL.format(id=0))
    if isinstance(url, str) and url.startswith(HF_URL):
        return url.removeprefix(HF_URL).strip("/")
    return kv.get(gguf.Keys.General.BASE_MODEL_NAME.format(id=0)) or url


def _write_names(gguf: Any, writer: Any, adapter: af.Adapter) -> None:
    """``general.name`` and the adapter's task keys from the GGUF source; the base as general.base_model.0.*
    (the source's keys where the base is unchanged)."""
    kv = _source(adapter).get("kv", {})
    for key in (gguf.Keys.General.NAME, gguf.Keys.Adapter.LORA_TASK_NAME, gguf.Keys.Adapter.LORA_PROMPT_PREFIX):
        if isinstance(kv.get(key), str):
            writer.add_string(key, kv[key])
    name = adapter.base.get("name")
    if name and _base_name(gguf, kv) == name:
        writer.add_base_model_count(1)
        for key, value in kv.items():
            if key.startswith("general.base_model.0.") and isinstance(value, str):
                writer.add_string(key, value)
    elif name:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, str(name))


def _hf_llama_names(n_blocks: int) -> list[str]:
    names = ["model.embed_tokens", "lm_head"]
    for i in range(n_blocks):
        names += [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkvo"]
        names += [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up", "down")]
    return names


def _name_map(gguf: Any, arch: Any, modules: list[str]) -> dict[str, str]:
    """``{module: llama.cpp name}`` for the modules gguf's tensor map knows."""
    n_blocks = 1 + max((int(m.group(1)) for x in modules if (m := LAYER.search("." + x))), default=-1)
    tmap = gguf.get_tensor_name_map(arch, max(n_blocks, 1))
    return {m: g for m in modules if (g := tmap.get_name(m)) is not None}


def _heads(modules: dict[str, str], arch_name: str, base: Any, n_heads: int | None,
           n_kv_heads: int | None) -> dict[str, int]:
    """``{module: heads}`` for the q/k modules whose lora_b rows llama.cpp permutes."""
    if not ARCHS[arch_name]:
        return {}
    qk = {m: g for m, g in modules.items() if g.rsplit(".", 1)[-1] in ("attn_q", "attn_k")}
    if not qk:
        return {}
    n, kv = af.attention_heads(base, n_heads, n_kv_heads, why="GGUF llama reorders q/k rows for RoPE")
    return {m: n if g.endswith("attn_q") else kv for m, g in qk.items()}


def read_gguf(path: str | Path, *, base: Any = None, n_heads: int | None = None,
              n_kv_heads: int | None = None) -> af.Adapter:
    """Read a llama.cpp LoRA adapter (see the module docstring for the mapping)."""
    gguf = _gguf()
    path = Path(path)
    reader, kv, tensors = _open(gguf, path)
    if kv.get("general.type") != "adapter" or kv.get("adapter.type") != "lora":
        raise af.UnsupportedError(f"not a GGUF LoRA adapter (general.type={kv.get('general.type')!r}, "
                                  f"adapter.type={kv.get('adapter.type')!r})", path=path)
    if gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS in kv:
        raise af.UnsupportedError(f"GGUF {gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS}: an activated LoRA (aLoRA, "
                                  "active only after its invocation tokens) cannot be read", path=path)
    arch_name = kv.get("general.architecture")
    arch = _arch(gguf, arch_name, path)
    quantized = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors if t.tensor_type.name not in FLOAT_TYPES]
    if quantized:
        raise af.UnsupportedError("quantized GGUF LoRA tensors cannot be read (f32/f16/bf16 only): "
                                  + ", ".join(quantized), path=path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for t in reader.tensors:
        stem, _, role = t.name.rpartition(".weight.")
        if role in ("lora_a", "lora_b") and len(t.shape) == 2:
            pairs.setdefault(stem, {})[role] = tensors[t.name]
        else:
            unknown.append(t.name)
    unknown += [f"{g}.weight (lora_a or lora_b missing)" for g, p in pairs.items() if len(p) != 2]
    candidates = ([n.removesuffix(".weight") for n in af.base_shapes(base) if n.endswith(".weight")]
                  if base is not None else _hf_llama_names(1 + max(
                      (int(g.split(".")[1]) for g in pairs if g.startswith("blk.")), default=0)))
    to_module: dict[str, list[str]] = {}
    for m, g in _name_map(gguf, arch, candidates).items():
        to_module.setdefault(g, []).append(m)
    unresolved = [f"{g} ({' or '.join(to_module.get(g, [])) or 'no module'})" for g in pairs
                  if len(to_module.get(g, [])) != 1]
    if unknown or unresolved:
        raise af.UnsupportedError("GGUF tensors this converter cannot place: " + ", ".join(sorted(unknown + unresolved)),
                                  path=path)
    alpha = float(kv.get("adapter.lora.alpha", 0.0))
    names = {to_module[g][0]: g for g in pairs}
    heads = _heads(names, arch_name, base, n_heads, n_kv_heads)
    factors = {}
    for m, g in names.items():
        a, b = pairs[g]["lora_a"], pairs[g]["lora_b"]
        if g == EMBEDDING:
            a = a.t().contiguous()
        if m in heads:
            b = af.rope_permute(b, heads[m], inverse=True)
        factors[m] = (a, b, alpha / b.shape[1] if alpha else 1.0)
    prov = {"tool": "llama.cpp", "format": "gguf", "source": str(path), "architecture": arch_name,
            "alpha": alpha, "kv": {k: v for k, v in kv.items() if isinstance(v, str | int | float)}}
    return af.lowrank_adapter(factors, config={"alpha": alpha}, provenance=prov, base=base,
                              base_name=_base_name(gguf, kv), path=path,
                              embeddings={m for m, g in names.items() if g == EMBEDDING})


def write_gguf(adapter: af.Adapter, path: str | Path, *, base: Any = None, arch: str | None = None,
               n_heads: int | None = None, n_kv_heads: int | None = None) -> Path:
    """Write ``adapter`` (plain LoRA on 2-D weights) as a llama.cpp LoRA ``.gguf`` file."""
    gguf = _gguf()
    path = Path(path)
    arch_name = _write_arch(adapter, arch, base)
    arch_id = _arch(gguf, arch_name)
    factors = af.lowrank_factors(adapter, "GGUF", conv=False)
    names = _name_map(gguf, arch_id, list(factors))
    missing = sorted(set(factors) - set(names))
    if missing:
        raise af.UnsupportedError(f"modules with no llama.cpp tensor name for architecture {arch_name!r}: "
                                  + ", ".join(missing))
    alphas = {m: af.alpha_for(s, a.shape[0]) for m, (a, _, s) in factors.items()}
    if len(set(alphas.values())) == 1:
        alpha = float(next(iter(alphas.values())))
    elif all(s == 1.0 for _, _, s in factors.values()):
        alpha = 0.0
    else:
        raise af.UnsupportedError("GGUF has one alpha per file (scale = alpha / r); these modules need different "
                                  "alphas: " + ", ".join(f"{m}={v}" for m, v in sorted(alphas.items())))
    heads = _heads(names, arch_name, base, n_heads, n_kv_heads)
    dtypes = {m: a.dtype for m, (a, b, _) in factors.items() if a.dtype not in (torch.float32, torch.float16,
                                                                              torch.bfloat16)}
    if dtypes:
        raise af.UnsupportedError("GGUF LoRA tensors are f32, f16 or bf16; cannot write " +
                                  ", ".join(f"{m} ({d})" for m, d in sorted(dtypes.items())))
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    _write_names(gguf, writer, adapter)
    for m, (a, b, _) in sorted(factors.items(), key=lambda kv: names[kv[0]]):
        if names[m] == EMBEDDING:
            a = a.t()
        if m in heads:
            b = af.rope_permute(b, heads[m])
        for role, t in (("lora_a", a), ("lora_b", b)):
            if t.dtype == torch.bfloat16:
                writer.add_tensor(f"{names[m]}.weight.{role}", t.contiguous().view(torch.int16).numpy().view(np.uint16),
                                  raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor(f"{names[m]}.weight.{role}", t.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class GgufFormat:
    """The ``gguf`` codec (:class:`adapterfmt.ForeignFormat`)."""

    name = "gguf"
    summary = "llama.cpp LoRA adapter: one .gguf file (general.type=adapter, adapter.type=lora)"

    def detect(self, path: Path) -> bool:
        if not path.is_file() or path.suffix != ".gguf":
            return False
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"

    def read(self, path: Path, **options: Any) -> af.Adapter:
        return read_gguf(path, **{k: options.get(k) for k in ("base", "n_heads", "n_kv_heads")})

    def write(self, adapter: af.Adapter, path: Path, **options: Any) -> None:
        write_gguf(adapter, path, **{k: options.get(k) for k in ("base", "arch", "n_heads", "n_kv_heads")})


@af.hookimpl
def adapterfmt_formats() -> list[Any]:
    return [GgufFormat()]
