"""The structured additive kinds (spec 6.10.8-6.10.12) mean what the spec says, and what cannot be converted is
refused in one line.

Each kind's dW is recomputed with numpy from the spec text alone and compared with ``kind.delta`` and with the
model after ``af.attach`` (unmerged, merged, unmerged again), in float32 after a save/load round trip.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers_peft import case, load_peft, logits
from helpers_spec import invoke
from safetensors.torch import load_file, save_file, save_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterfmt as af

ATOL = 1e-5
GEN = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def fshape(entry: dict) -> tuple[int, int]:
    s = tuple(entry["shape"])
    return s[::-1] if entry.get("params", {}).get("transposed") else s


def fourier_dw(entry: dict, t: dict) -> np.ndarray:
    """6.10.8: D.flat[indices[j]] = spectrum[j]; dW_f = scale * Re(ifft2(D))."""
    d = np.zeros(fshape(entry))
    d.flat[t["indices"]] = t["spectrum"]
    return entry["params"].get("scale", 1.0) * np.fft.ifft2(d).real


def vector_bank_dw(entry: dict, t: dict) -> np.ndarray:
    """6.10.9: top-k softmax mixes of bank rows; A row-major, B through [out/L, L, r]; dW_f = B @ A."""
    k, bank = entry["params"]["topk"], t["vector_bank"]

    def mix(z: np.ndarray) -> np.ndarray:
        pos = np.argsort(-z, axis=-1, kind="stable")[..., :k]  # ties: the lower position first
        top = np.take_along_axis(z, pos, -1)
        w = np.exp(top - top.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        return (w[..., None] * bank[pos]).sum(-2)

    la, lb = t["logits_A"], t["logits_B"]
    a = mix(la).reshape(la.shape[0], -1)
    b = mix(lb).transpose(0, 2, 1).reshape(-1, lb.shape[1])
    return b @ a


def randlora_dw(entry: dict, t: dict) -> np.ndarray:
    """6.10.10: U_A = (lambda ⊙ basis_A ⊙ gamma) as [r*nb, lo], U_B = basis_B as [hi, nb*r], P = U_B @ U_A."""
    out, n_in = fshape(entry)
    lo, hi = min(out, n_in), max(out, n_in)
    lam, gam = t["lambda"], t["gamma"]
    r, nb = lam.shape
    ua = (lam[:, :, None] * t["basis_A"][:, :nb, :lo] * gam[None]).reshape(r * nb, lo)
    p = t["basis_B"][:hi, :nb, :].reshape(hi, nb * r) @ ua
    return entry["params"].get("scale", 1.0) * (p if n_in <= out else p.T)


def circulant_dw(entry: dict, t: dict) -> np.ndarray:
    """6.10.11: dW_f[m*b + p, n*b + q] = scale * kernel[m, n, (q - p) mod b]."""
    k = t["kernel"]
    m_, n_, b = k.shape
    dw = np.zeros((m_ * b, n_ * b))
    for m in range(m_):
        for n in range(n_):
            for p in range(b):
                for q in range(b):
                    dw[m * b + p, n * b + q] = k[m, n, (q - p) % b]
    return entry["params"].get("scale", 1.0) * dw


def tile_dw(entry: dict, t: dict) -> np.ndarray:
    """6.10.12 tile: dW_f[o, i] = block[i mod r, o mod c]."""
    out, n_in = fshape(entry)
    r, c = t["block"].shape
    return np.array([[t["block"][i % r, o % c] for i in range(n_in)] for o in range(out)])


def stored(entry: dict, dw_f: np.ndarray) -> np.ndarray:
    return dw_f.T if entry.get("params", {}).get("transposed") else dw_f


def example(kind: str, layer: nn.Module) -> tuple[af.Adapter, dict]:
    """A one-module adapter of ``kind`` for ``layer`` (its function shape [12, 8] or [8, 12])."""
    entry = af.module_entry(kind, layer)
    out, n_in = fshape(entry)
    if kind == "fourier":
        entry["params"]["scale"] = 30.0
        t = {"spectrum": rand(9), "indices": torch.randperm(out * n_in, generator=GEN)[:9]}
    elif kind == "vector_bank":
        entry["params"].update({"topk": 2, "shared": {"vector_bank": "bank"}})
        t = {"logits_A": rand(3, n_in // 4, 5), "logits_B": rand(out // 4, 3, 5), "vector_bank": rand(5, 4)}
    elif kind == "randlora":
        entry["params"].update({"scale": 0.5, "shared": {"basis_A": "ba", "basis_B": "bb"}})
        t = {"lambda": rand(3, 3), "gamma": rand(3, min(out, n_in)), "basis_A": rand(3, 1, 9),
             "basis_B": rand(13, 4, 3)}
    elif kind == "circulant":
        entry["params"]["scale"] = 1 / n_in
        t = {"kernel": rand(out // 4, n_in // 4, 4)}
    else:
        t = {"block": rand(3, out // 2)}
    shared = entry["params"].get("shared", {})
    tensors = {shared.get(r, f"m.{r}"): v for r, v in t.items()}
    return af.validate(af.Adapter(af.new_manifest("x", {"m": entry}), tensors)), t


SPEC_DW = {"fourier": fourier_dw, "vector_bank": vector_bank_dw, "randlora": randlora_dw,
           "circulant": circulant_dw, "block_share": tile_dw}
LAYERS = {"linear-12x8": lambda: nn.Linear(8, 12), "linear-8x12": lambda: nn.Linear(12, 8),
          "conv1d-12x8": lambda: Conv1D(12, 8)}


@pytest.mark.parametrize("layer_name", sorted(LAYERS))
@pytest.mark.parametrize("kind", sorted(SPEC_DW))
def test_kind_matches_spec(tmp_path, kind, layer_name):
    torch.manual_seed(0)
    module = nn.Sequential(LAYERS[layer_name]())
    adapter, t = example(kind, module[0])
    adapter = af.load(af.save(adapter, tmp_path / "a.safetensors"))
    entry = adapter.modules["m"]
    want = stored(entry, SPEC_DW[kind](entry, {r: v.double().numpy() if v.is_floating_point() else v.numpy()
                                                      for r, v in t.items()}))
    got = af.registry.get_kind(kind).delta(entry, adapter.module_tensors("m"))
    np.testing.assert_allclose(got.numpy(), want, atol=ATOL)

    x = rand(5, fshape(entry)[1])
    ref = nn.Sequential(LAYERS[layer_name]())
    ref.load_state_dict(module.state_dict())
    with torch.no_grad():
        ref[0].weight += torch.tensor(want, dtype=torch.float32)
        expected, plain = ref(x), module(x)
    renamed = af.Adapter(af.new_manifest("x", {"0": entry}), {("0." + n[2:] if n.startswith("m.") else n): v
                                                              for n, v in adapter.tensors().items()})
    af.attach(module, renamed, name="a")
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, atol=ATOL, rtol=0)
        af.merge_into(module, "a")
        torch.testing.assert_close(module(x), expected, atol=ATOL, rtol=0)
        af.unmerge(module, "a")
        af.detach(module)
        torch.testing.assert_close(module(x), plain, atol=1e-6, rtol=0)


def test_vector_bank_ties_go_to_the_lower_position():
    """6.10.9: of equal logits the lower bank positions are taken (a stable descending sort). torch.topk on the
    CPU takes e.g. positions 2 and 3 of four equal logits; the kind takes 0 and 1, as the spec's reference."""
    bank = torch.arange(4 * 4, dtype=torch.float32).reshape(4, 4)
    entry = {"kind": "vector_bank", "shape": [4, 4], "params": {"topk": 2, "shared": {"vector_bank": "bank"}}}
    t = {"logits_A": torch.tensor([[[1.0, 1.0, 1.0, 1.0]]]), "logits_B": torch.tensor([[[0.0, 2.0, 2.0, 2.0]]]),
         "vector_bank": bank}
    got = af.registry.get_kind("vector_bank").function_delta(entry, t)
    a = (bank[0] + bank[1]) / 2  # equal logits: equal softmax weights
    b = (bank[1] + bank[2]) / 2
    want = b.reshape(4, 1) @ a.reshape(1, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    np.testing.assert_allclose(vector_bank_dw(entry, {k: v.double().numpy() for k, v in t.items()}),
                               want.double().numpy(), rtol=1e-12)


def test_block_share_bat_matches_spec():
    """6.10.12 bat: W'_f(m, n) = W_f(m, n) @ (I + block[m]) + block[m]; merge keeps the weight to restore it."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 12))
    block = 0.3 * rand(3, 4, 4)
    entry = {"kind": "block_share", "shape": [12, 8], "params": {"mode": "bat"}}
    adapter = af.validate(af.Adapter(af.new_manifest("miss", {"0": entry}), {"0.block": block}))
    w = module[0].weight.detach().double().numpy()
    b = block.double().numpy()
    new = w.copy()
    for m in range(3):
        for n in range(2):
            blk = w[m * 4:m * 4 + 4, n * 4:n * 4 + 4]
            new[m * 4:m * 4 + 4, n * 4:n * 4 + 4] = blk @ (np.eye(4) + b[m]) + b[m]
    x = rand(5, 8)
    with torch.no_grad():
        before = module[0].weight.clone()
        expected = x @ torch.tensor(new, dtype=torch.float32).t() + module[0].bias
        af.attach(module, adapter, name="a")
        torch.testing.assert_close(module(x), expected, atol=ATOL, rtol=0)
        af.merge_into(module, "a")
        torch.testing.assert_close(module(x), expected, atol=ATOL, rtol=0)
        af.unmerge(module, "a")
        assert torch.equal(module[0].weight, before)
    with pytest.raises(af.UnsupportedError, match="block_share"):
        af.merge_adapters([adapter, adapter], strategy="linear")


def test_kinds_refuse_bad_entries():
    bad = [({"kind": "fourier", "shape": [4, 4], "params": {}},
            {"m.spectrum": rand(2), "m.indices": torch.tensor([3, 3])}, "must not repeat"),
           ({"kind": "vector_bank", "shape": [8, 8], "params": {"topk": 9, "shared": {"vector_bank": "b"}}},
            {"m.logits_A": rand(2, 2, 5), "m.logits_B": rand(2, 2, 5), "b": rand(5, 4)}, "topk"),
           ({"kind": "circulant", "shape": [8, 8], "params": {}}, {"m.kernel": rand(2, 3, 4)}, "kernel"),
           ({"kind": "block_share", "shape": [8, 8], "params": {"mode": "tile"}}, {"m.block": rand(2, 3)}, "tile"),
           ({"kind": "randlora", "shape": [8, 8], "params": {"shared": {"basis_A": "a", "basis_B": "b"}}},
            {"m.lambda": rand(2, 4), "m.gamma": rand(4, 8), "a": rand(2, 2, 8), "b": rand(8, 4, 2)}, "basis_A")]
    for entry, tensors, match in bad:
        with pytest.raises(af.FormatError, match=match):
            af.validate(af.Adapter(af.new_manifest("x", {"m": entry}), tensors))


# ----- conversions that cannot be represented, and Bone ------------------------------------------------------------
def _refused(tmp_path, folder, base, match):
    out = tmp_path / "refused.safetensors"
    r = invoke("convert", str(folder), str(out), "--base", str(base))
    assert r.exit_code == 1 and re.search(match, r.output) and r.output.strip().count("\n") == 0, r.output
    assert not out.exists()


def _edit_config(folder, **fields):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def miss_case(tmp_path_factory):
    from peft import MissConfig

    tmp = tmp_path_factory.mktemp("miss")
    c = case(tmp, "llama", MissConfig(target_modules=["q_proj", "down_proj"], r=4, init_weights=False))
    save_model(c.base, str(tmp / "base.safetensors"))
    return c, tmp / "base.safetensors"


def test_bone_reads_as_miss(tmp_path, miss_case):
    """A Bone folder (PEFT <= 0.17: peft_type BONE, bone_block) reads as MiSS and writes back as MISS."""
    c, base = miss_case
    bone = tmp_path / "bone"
    bone.mkdir()
    t = load_file(c.folder / "adapter_model.safetensors")
    save_file({k.replace(".miss_block", ".bone_block"): v for k, v in t.items()}, bone / "adapter_model.safetensors")
    cfg = json.loads((c.folder / "adapter_config.json").read_text())
    cfg = {**{k: v for k, v in cfg.items() if k not in ("mini_r", "miss_dropout")}, "peft_type": "BONE",
           "bone_dropout": 0.0}
    (bone / "adapter_config.json").write_text(json.dumps(cfg))
    adapter = af.read_foreign(bone, base=base)
    assert adapter.method == "miss" and {e["kind"] for e in adapter.modules.values()} == {"block_share"}
    model = c.base
    af.attach(model, adapter)
    torch.testing.assert_close(logits(model, c.ids), c.expected, atol=ATOL, rtol=0)
    af.detach(model)
    back = af.to_peft(adapter, tmp_path / "back")
    assert json.loads((back / "adapter_config.json").read_text())["peft_type"] == "MISS"
    pm, missing, unexpected = load_peft("llama", back)
    assert missing == [] and unexpected == []
    torch.testing.assert_close(logits(pm, c.ids), c.expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("field,value,match", [
    ("bias", "all", r"MISS with bias='all' \(trained base biases\) cannot be represented"),
    ("init_weights", "bat", r"miss_block \[4, 16\] is not \[4, 4, 4\] \(init_weights='bat'\)"),
])
def test_refusals_name_the_field(tmp_path, miss_case, field, value, match):
    c, base = miss_case
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes((c.folder / "adapter_model.safetensors").read_bytes())
    (folder / "adapter_config.json").write_text((c.folder / "adapter_config.json").read_text())
    _edit_config(folder, **{field: value})
    _refused(tmp_path, folder, base, match)


def test_unrepresentable_peft_options_are_refused(tmp_path):
    from peft import FourierFTConfig

    # FourierFT positions PEFT would not draw from its seed cannot go back to PEFT
    c = case(tmp_path / "f", "llama", FourierFTConfig(target_modules=["q_proj"], n_frequency=5))
    base = tmp_path / "base.safetensors"
    save_model(c.base, str(base))
    adapter = af.read_foreign(c.folder, base=base)
    adapter.manifest["provenance"] = []
    path = "model.layers.0.self_attn.q_proj"
    tensors = {**adapter.tensors(), f"{path}.indices": adapter.module_tensors(path)["indices"].flip(0)}
    moved = af.Adapter(adapter.manifest, tensors)
    with pytest.raises(af.UnsupportedError, match=rf"module '{path}': its frequencies are not the ones PEFT"):
        af.to_peft(moved, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_vector_bank_topk_form_matches_spec():
    """6.10.9 top-k form: mix = sum_j topk_weights[..., j] * vector_bank[topk_indices[..., j]] (no softmax)."""
    entry = {"kind": "vector_bank", "shape": [12, 8], "params": {"topk": 2, "shared": {"vector_bank": "bank"}}}
    bank, tensors = rand(5, 4), {}
    for side, shape in (("A", (3, 2)), ("B", (3, 3))):
        tensors[f"m.topk_indices_{side}"] = torch.randint(0, 5, (*shape, 2), generator=GEN)
        tensors[f"m.topk_weights_{side}"] = rand(*shape, 2)
    adapter = af.validate(af.Adapter(af.new_manifest("vblora", {"m": entry}), {**tensors, "bank": bank}))
    t = {k[2:]: v.numpy() for k, v in tensors.items()}
    b_np = bank.double().numpy()

    def mix(side):
        return (t[f"topk_weights_{side}"][..., None] * b_np[t[f"topk_indices_{side}"]]).sum(-2)

    a = mix("A").reshape(3, 8)
    b = mix("B").transpose(0, 2, 1).reshape(12, 3)
    got = af.registry.get_kind("vector_bank").delta(entry, adapter.module_tensors("m"))
    np.testing.assert_allclose(got.numpy(), b @ a, atol=ATOL)
    mixed = {**tensors, "m.logits_A": rand(3, 2, 5), "bank": bank}
    with pytest.raises(af.FormatError, match="needs logits_A and logits_B, or topk_indices_A"):
        af.validate(af.Adapter(af.new_manifest("vblora", {"m": entry}), mixed))
