"""The diffusers LoRA format for ``adapter convert``: one ``.safetensors`` (``pytorch_lora_weights.safetensors``).

Keys are ``<component>.<module path>.<role>`` with component ``unet``, ``transformer``, ``text_encoder`` or
``text_encoder_2``; the module path in adapterfmt keeps the component (``unet.down_blocks.0.proj_in``), as
a pipeline module holding the components names it. Roles: PEFT style ``lora_A.weight`` ``[r, in(, kh, kw)]``
/ ``lora_B.weight`` ``[out, r(, 1, 1)]``, or the older ``lora.down.weight`` / ``lora.up.weight``; an
optional scalar ``<component>.<module>.alpha`` gives dW = alpha / r * B @ A (absent: alpha = r, scale 1).
Writing keeps the source file's style and which modules had alpha keys; otherwise it writes PEFT style with
alpha keys only where the scale is not 1. Modules outside the four components, other kinds, DoRA and LoRA
bias are refused by name; so is any tensor a reader cannot place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import adapterfmt as af

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
STYLES = {"peft": (".lora_A.weight", ".lora_B.weight"), "legacy": (".lora.down.weight", ".lora.up.weight")}
SUFFIXES = {s: (style, i) for style, pair in STYLES.items() for i, s in enumerate(pair)}


def _split(key: str) -> tuple[str, str] | None:
    """``(module, role)`` of a diffusers key, role in SUFFIXES or ``.alpha``; None if not one."""
    if key.split(".", 1)[0] not in COMPONENTS:
        return None
    for suffix in (*SUFFIXES, ".alpha"):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None


def read_diffusers(path: str | Path, *, base: Any = None) -> af.Adapter:
    """Read a diffusers LoRA ``.safetensors`` (see the module docstring)."""
    path = Path(path)
    raw, meta = af.read_tensor_file(path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown, styles = [], set()
    for key, t in raw.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        parts.setdefault(split[0], {})[split[1]] = t
        if split[1] in SUFFIXES:
            styles.add(SUFFIXES[split[1]][0])
    factors = {}
    for m, p in parts.items():
        pair = next((STYLES[s] for s in STYLES if STYLES[s][0] in p and STYLES[s][1] in p), None)
        if pair is None or len(p) - (".alpha" in p) != 2:
            unknown.append(f"{m} ({', '.join(sorted(p))}: not one lora A/B pair)")
            continue
        a, b = p[pair[0]], p[pair[1]]
        alpha = float(p[".alpha"]) if ".alpha" in p else None
        factors[m] = (a, b, alpha / a.shape[0] if alpha is not None else 1.0)
    if unknown:
        raise af.UnsupportedError("diffusers tensors this converter cannot place: " + ", ".join(sorted(unknown)),
                                  path=path)
    prov = {"tool": "diffusers", "format": "diffusers", "source": str(path), "metadata": meta,
            "style": styles.pop() if len(styles) == 1 else "peft",
            "alpha_keys": sorted(m for m, p in parts.items() if ".alpha" in p)}
    return af.lowrank_adapter(factors, provenance=prov, base=base, path=path)


def write_diffusers(adapter: af.Adapter, path: str | Path) -> Path:
    """Write ``adapter`` (plain LoRA on modules under unet / transformer / text_encoder(_2)) as diffusers LoRA."""
    path = Path(path)
    factors = af.lowrank_factors(adapter, "diffusers")
    outside = sorted(m for m in factors if m.split(".", 1)[0] not in COMPONENTS or "." not in m)
    if outside:
        raise af.UnsupportedError(f"diffusers LoRA modules live under {', '.join(COMPONENTS)}; outside them: "
                                  + ", ".join(outside))
    src = next((p for p in reversed(adapter.manifest.get("provenance", [])) if p.get("format") == "diffusers"), {})
    down, up = STYLES[src.get("style", "peft")]
    alpha_keys = set(src.get("alpha_keys", []))
    tensors = {}
    for m, (a, b, scale) in factors.items():
        tensors[m + down], tensors[m + up] = a, b
        if scale != 1.0 or m in alpha_keys:
            tensors[f"{m}.alpha"] = torch.tensor(float(af.alpha_for(scale, a.shape[0])), dtype=torch.float32)
    af.write_tensor_file(path, tensors, src.get("metadata") or None)
    return path


class DiffusersFormat:
    """The ``diffusers`` codec (:class:`adapterfmt.ForeignFormat`)."""

    name = "diffusers"
    summary = "diffusers LoRA .safetensors (unet./transformer./text_encoder. keys, lora_A/lora_B or lora.down/up)"

    def detect(self, path: Path) -> bool:
        names = af.tensor_names(path)
        return bool(names) and all(_split(n) for n in names)

    def read(self, path: Path, **options: Any) -> af.Adapter:
        return read_diffusers(path, base=options.get("base"))

    def write(self, adapter: af.Adapter, path: Path, **options: Any) -> None:
        write_diffusers(adapter, path)


@af.hookimpl
def adapterfmt_formats() -> list[Any]:
    return [DiffusersFormat()]
