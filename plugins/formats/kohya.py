"""The kohya / LyCORIS format (sd-scripts style single ``.safetensors``) for ``adapter convert``.

Tensor names are ``<prefix><module path with "." replaced by "_">.<role>``: prefixes ``lora_unet_``,
``lora_te_`` (``lora_te1_`` / ``lora_te2_`` for two text encoders) and ``lora_transformer_``; LLM-style
modules take ``lora_unet_`` unless ``prefix=`` says otherwise. Roles and math (per module, r as noted,
``alpha`` a scalar tensor; absent or 0 => alpha = r, i.e. scale 1, as sd-scripts and LyCORIS read it):

- LoRA: ``lora_down.weight`` ``[r, in(, kh, kw)]`` = A, ``lora_up.weight`` ``[out, r(, 1, 1)]`` = B;
  dW = alpha / r * up @ down -> kind ``lowrank``.
- LyCORIS LoHa: ``hada_w1_a`` ``[out, r]``, ``hada_w1_b`` ``[r, in]``, ``hada_w2_a``, ``hada_w2_b``;
  dW = alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b) -> kind ``hadamard``.
- LyCORIS LoKr: ``lokr_w1`` or ``lokr_w1_a`` @ ``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a`` @ ``lokr_w2_b``;
  dW = scale * kron(w1, w2) with scale = alpha / r (r = the inner dim of the decomposed pair; two pairs
  of different inner dims are refused, as LyCORIS cannot load them), or 1 when both are full matrices
  (LyCORIS ignores their alpha; 1 is written where none was read) -> kind ``kronecker``.

Underscored names are ambiguous (``down_blocks_0`` could be ``down_blocks.0`` or ``down.blocks_0``), so
reading resolves them against a base model's module names (``base=``: checkpoint or live module; module
paths under ``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` / ``transformer.`` match their component's
prefix) and names every key it cannot resolve. Files written here carry the module paths and shapes in
their ``__metadata__`` (``adapterfmt_modules``), so they read back without a base. Tucker factors
(``hada_t1``, ``lokr_t2``, ``lora_mid``), DoRA's ``dora_scale`` and any other tensor are refused by name.
Writing gives every module an ``alpha`` (LyCORIS cannot load a module without one); a scale of 0 cannot
be written (alpha 0 means scale 1 to sd-scripts and LyCORIS). Alphas read that do not set a scale (0, or
on a LoKr of two full factors) are kept in the provenance and written back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

import adapterfmt as af

COMPONENTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
              "lora_te2_": "text_encoder_2", "lora_transformer_": "transformer"}
DEFAULT_PREFIX = "lora_unet_"
META_KEY = "adapterfmt_modules"
KINDS = {"lowrank": ("lora_down.weight", "lora_up.weight"),
         "hadamard": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
         "kronecker": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}
ROLE_KIND = {role: kind for kind, roles in KINDS.items() for role in roles}
PREFIX_RE = re.compile("^(" + "|".join(sorted(map(re.escape, COMPONENTS), key=len, reverse=True)) + ")")


def _flat(module: str) -> str:
    return module.replace(".", "_")


def _rank(kind: str, t: dict[str, torch.Tensor]) -> int | None:
    """The r of ``alpha / r``; None for a LoKr of two full factors (scale 1 whatever its alpha)."""
    if kind == "lowrank":
        return t["lora_down.weight"].shape[0]
    if kind == "hadamard":
        return t["hada_w1_b"].shape[0]
    dims = {t[pair].shape[1] for pair in ("lokr_w1_a", "lokr_w2_a") if pair in t}
    if len(dims) > 1:
        raise ValueError(f"LoKr pairs of different inner dims {sorted(dims)}")
    return dims.pop() if dims else None


def _function_shape(kind: str, t: dict[str, torch.Tensor]) -> list[int]:
    """The weight shape the factors imply (exact for LoRA and 2-D LoHa / LoKr)."""
    if kind == "lowrank":
        return [t["lora_up.weight"].shape[0], *t["lora_down.weight"].shape[1:]]
    return af.factor_shape(kind, t)


def _candidates(base: Any) -> dict[str, list[str]]:
    """``{kohya name: [module paths]}`` for every weight-bearing module of ``base``."""
    out: dict[str, list[str]] = {}
    for name in af.base_shapes(base):
        if not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        for prefix, component in COMPONENTS.items():
            rest = module.removeprefix(component + ".")
            for kname in {prefix + _flat(module), prefix + _flat(rest)}:
                if module not in out.setdefault(kname, []):
                    out[kname].append(module)
    return out


def read_kohya(path: str | Path, *, base: Any = None) -> af.Adapter:
    """Read a kohya / LyCORIS ``.safetensors`` (see the module docstring)."""
    path = Path(path)
    raw, meta = af.read_tensor_file(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in raw.items():
        kname, _, role = key.partition(".")
        if PREFIX_RE.match(kname) and (role in ROLE_KIND or role == "alpha"):
            groups.setdefault(kname, {})[role] = t
        else:
            unknown.append(key)
    kinds = {}
    for kname, t in groups.items():
        found = {ROLE_KIND[r] for r in t if r != "alpha"}
        if len(found) != 1:
            unknown.append(f"{kname} ({'mixes ' + ', '.join(sorted(found)) if found else 'alpha only'})")
        elif "lowrank" in found and len(t) - ("alpha" in t) != 2:
            unknown.append(f"{kname} (lora_down or lora_up missing)")
        else:
            kinds[kname] = found.pop()
    if unknown:
        raise af.UnsupportedError("kohya tensors this converter cannot place: " + ", ".join(sorted(unknown)), path=path)
    known = json.loads(meta.get(META_KEY, "{}"))
    shapes = af.base_shapes(base) if base is not None else {}
    names = _candidates(base) if base is not None else {}
    unresolved = sorted(k for k in kinds if k not in known and len(names.get(k, [])) != 1)
    if unresolved:
        why = ("no base model was given (base= / --base) to resolve underscored names against" if base is None else
               "they match no module of the base model, or several")
        raise af.UnsupportedError(f"kohya module names not resolved ({why}): " + ", ".join(
            f"{k}{' (' + ' or '.join(names[k]) + ')' if names.get(k) else ''}" for k in unresolved), path=path)
    modules, tensors, inert_alpha, bad = {}, {}, {}, []
    for kname, kind in sorted(kinds.items()):
        t = dict(groups[kname])
        alpha_t = t.pop("alpha", None)
        try:
            r = _rank(kind, t)
        except ValueError as e:
            bad.append(f"{kname} ({e})")
            continue
        alpha = float(alpha_t) if alpha_t is not None else None
        if alpha is not None and (r is None or alpha == 0):
            inert_alpha[kname] = alpha
        scale = 1.0 if r is None or not alpha else alpha / r
        if kname in known:
            module, shape, transposed = known[kname]["module"], known[kname]["shape"], known[kname]["transposed"]
        else:
            module = names[kname][0]
            fshape = _function_shape(kind, t)
            stored = list(shapes.get(f"{module}.weight", fshape))
            transposed = len(stored) == 2 and stored == fshape[::-1] != fshape
            shape = stored
        params: dict[str, Any] = {"scale": scale, **({"transposed": True} if transposed else {})}
        modules[module] = {"kind": kind, "shape": shape, "params": params}
        if kind == "lowrank":
            t = {"lora_A": t["lora_down.weight"], "lora_B": t["lora_up.weight"]}
        tensors.update({f"{module}.{role}": v for role, v in t.items()})
    if bad:
        raise af.UnsupportedError("kohya modules this converter cannot read: " + ", ".join(bad), path=path)
    prov = {"tool": "kohya", "format": "kohya", "source": str(path), "metadata": {k: v for k, v in meta.items()
                                                                                  if k != META_KEY},
            "inert_alpha": inert_alpha}
    method = {"lowrank": "lora", "hadamard": "loha", "kronecker": "lokr"}
    used = {m["kind"] for m in modules.values()}
    manifest = af.new_manifest(method[used.pop()] if len(used) == 1 else "lora", modules, provenance=[prov],
                               base={"name": None, "revision": None, "fingerprint": af.base_fingerprint(base)})
    return af.Adapter(manifest, tensors)


def _kohya_names(modules: list[str], prefix: str) -> dict[str, str]:
    two_te = any(m.startswith("text_encoder_2.") for m in modules)
    out = {}
    for m in modules:
        comp, _, rest = m.partition(".")
        if comp == "text_encoder" and rest:
            out[m] = ("lora_te1_" if two_te else "lora_te_") + _flat(rest)
        elif comp in ("unet", "text_encoder_2", "transformer") and rest:
            out[m] = {"unet": "lora_unet_", "text_encoder_2": "lora_te2_", "transformer": "lora_transformer_"}[comp] \
                + _flat(rest)
        else:
            out[m] = prefix + _flat(m)
    return out


def write_kohya(adapter: af.Adapter, path: str | Path, *, prefix: str | None = None) -> Path:
    """Write ``adapter`` (LoRA, LoHa, LoKr modules) as one kohya / LyCORIS ``.safetensors`` file."""
    path = Path(path)
    prefix = prefix or DEFAULT_PREFIX
    if prefix not in COMPONENTS:
        raise af.UnsupportedError(f"kohya prefix {prefix!r} is not one of {', '.join(COMPONENTS)}")
    src = next((p for p in reversed(adapter.manifest.get("provenance", [])) if p.get("format") == "kohya"), {})
    mods = adapter.modules
    names = _kohya_names(sorted(mods), prefix)
    clashes = sorted(n for n in set(names.values()) if list(names.values()).count(n) > 1)
    bad = [f"{n} (the kohya name of several modules)" for n in clashes]
    tensors: dict[str, torch.Tensor] = {}
    meta_modules = {}
    for m, e in sorted(mods.items()):
        kname, kind, roles = names[m], e["kind"], set(adapter.roles(m))
        if kind not in KINDS or (kind == "lowrank" and roles != {"lora_A", "lora_B"}):
            bad.append(f"{m} ({'kind ' + kind if kind not in KINDS else 'roles ' + ', '.join(sorted(roles))})")
            continue
        t = adapter.module_tensors(m)
        if kind == "lowrank":
            a, b = t["lora_A"], t["lora_B"]
            t = {"lora_down.weight": a, "lora_up.weight": b.reshape(b.shape[0], a.shape[0], *[1] * (a.dim() - 2))}
        scale = float(e.get("params", {}).get("scale", 1.0))
        try:
            r = _rank(kind, t)
        except ValueError as err:
            bad.append(f"{m} ({err})")
            continue
        if r is None and scale != 1.0:
            bad.append(f"{m} (LoKr with two full factors has scale 1 in LyCORIS, this one has {scale})")
            continue
        if scale == 0.0:
            bad.append(f"{m} (scale 0: alpha 0 means scale 1 to sd-scripts and LyCORIS)")
            continue
        tensors.update({f"{kname}.{role}": v for role, v in t.items()})
        inert = src.get("inert_alpha", {})
        alpha = (inert[kname] if scale == 1.0 and kname in inert else
                 float(af.alpha_for(scale, r)) if r is not None else 1.0)
        tensors[f"{kname}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        meta_modules[kname] = {"module": m, "shape": e["shape"], "transposed": bool(e.get("params", {}).get("transposed"))}
    if bad:
        raise af.UnsupportedError("the kohya format cannot represent: " + "; ".join(bad))
    meta = {**src.get("metadata", {}), META_KEY: json.dumps(meta_modules, sort_keys=True)}
    af.write_tensor_file(path, tensors, meta)
    return path


class KohyaFormat:
    """The ``kohya`` codec (:class:`adapterfmt.ForeignFormat`)."""

    name = "kohya"
    summary = "kohya sd-scripts / LyCORIS single .safetensors (lora_unet_..., lora_te_...; LoRA, LoHa, LoKr)"

    def detect(self, path: Path) -> bool:
        names = af.tensor_names(path)
        return bool(names) and all(PREFIX_RE.match(n) for n in names)

    def read(self, path: Path, **options: Any) -> af.Adapter:
        return read_kohya(path, base=options.get("base"))

    def write(self, adapter: af.Adapter, path: Path, **options: Any) -> None:
        write_kohya(adapter, path, prefix=options.get("prefix"))


@af.hookimpl
def adapterfmt_formats() -> list[Any]:
    return [KohyaFormat()]
