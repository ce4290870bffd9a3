"""The GGUF format (llama.cpp LoRA adapters) for ``adapter convert``, through the ``gguf`` package.

A llama.cpp LoRA is one ``.gguf`` file with ``general.type = "adapter"``, ``adapter.type = "lora"``,
``general.architecture`` (the base's) and one ``adapter.lora.alpha`` for the whole file, and tensors
``<llama.cpp tensor name>.weight.lora_a`` / ``.lora_b`` (``blk.0.attn_q.weight.lora_a`` ...). GGUF lists
dimensions innermost first (ggml's ``ne``); in row-major (numpy / torch) order ``lora_a`` is ``[r, in]``
and ``lora_b`` ``[out, r]`` — PEFT's layout — except ``token_embd``, whose ``lora_a`` is stored transposed
(``[vocab, r]``). llama.cpp scales each pair by ``alpha / r`` (r = ``lora_b``'s inner dimension), or by 1
when alpha is 0.

Module names map through gguf's own ``TensorNameMap`` for the architecture (as llama.cpp's
``convert_lora_to_gguf.py`` does); reading maps back onto the base model's module names (``base=``) or,
without a base, onto Hugging Face Llama names. For ``llama``, llama.cpp's converter reorders the output
rows of q and k for its interleaved RoPE (``permute`` in ``convert_hf_to_gguf.py``), which for a LoRA
reorders the rows of ``lora_b``: reading undoes it and writing does it, with the head counts from
``n_heads`` / ``n_kv_heads`` or the base's config. Only f32 / f16 tensors are read (bf16 is written as
f32, losslessly); quantized adapters are refused. One alpha per file: an adapter whose modules need
different alphas (``scale * r`` differs) is refused, naming them, unless every scale is 1 (alpha 0).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

import adapterfmt as af

ARCHS = {"llama": True, "qwen2": False}
"""Architectures whose q/k row order is known: True where llama.cpp's converter permutes it for RoPE."""
FLOAT_TYPES = ("F32", "F16")
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
    reader = gguf.GGUFReader(path)
    kv = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    if kv.get("general.type") != "adapter" or kv.get("adapter.type") != "lora":
        raise af.UnsupportedError(f"not a GGUF LoRA adapter (general.type={kv.get('general.type')!r}, "
                                  f"adapter.type={kv.get('adapter.type')!r})", path=path)
    arch_name = kv.get("general.architecture")
    arch = _arch(gguf, arch_name, path)
    quantized = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors if t.tensor_type.name not in FLOAT_TYPES]
    if quantized:
        raise af.UnsupportedError("quantized GGUF LoRA tensors cannot be read (f32/f16 only): " + ", ".join(quantized),
                                  path=path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for t in reader.tensors:
        stem, _, role = t.name.rpartition(".weight.")
        if role in ("lora_a", "lora_b") and len(t.data.shape) == 2:
            pairs.setdefault(stem, {})[role] = torch.from_numpy(np.array(t.data))
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
                              base_name=kv.get("general.name"), path=path)


def write_gguf(adapter: af.Adapter, path: str | Path, *, base: Any = None, arch: str | None = None,
               n_heads: int | None = None, n_kv_heads: int | None = None) -> Path:
    """Write ``adapter`` (plain LoRA on 2-D weights) as a llama.cpp LoRA ``.gguf`` file."""
    gguf = _gguf()
    path = Path(path)
    src = next((p for p in reversed(adapter.manifest.get("provenance", [])) if p.get("format") == "gguf"), {})
    arch_name = arch or src.get("architecture") or "llama"
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
        raise af.UnsupportedError("GGUF LoRA tensors are f32 or f16; cannot write " +
                                  ", ".join(f"{m} ({d})" for m, d in sorted(dtypes.items())))
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    if adapter.base.get("name"):
        writer.add_name(str(adapter.base["name"]))
    for m, (a, b, _) in sorted(factors.items(), key=lambda kv: names[kv[0]]):
        if names[m] == EMBEDDING:
            a = a.t()
        if m in heads:
            b = af.rope_permute(b, heads[m])
        for role, t in (("lora_a", a), ("lora_b", b)):
            t = t.float() if t.dtype == torch.bfloat16 else t
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
