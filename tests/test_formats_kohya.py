"""kohya / LyCORIS codec: single .safetensors with lora_unet_ / lora_te_ names, LoRA (incl. conv), LoHa, LoKr.

Dense references use sd-scripts / LyCORIS math on the written tensors: LoRA dW = alpha / r * up @ down
(conv: over the flattened input dims), LoHa dW = alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b) with r =
w1_b's rows, LoKr dW = alpha / r * kron(w1, w2_a @ w2_b) with r = w2_a's columns. LyCORIS itself
(lycoris-lora) is the oracle for files it writes and reads: LoCon, LoHa and full-factor LoKr.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_formats import ATOL, Pipe, assert_same_tensors, check_function, llama, llama_modules, lora_adapter
from safetensors.torch import load_file, save_file
from torch import nn

import adapterfmt as af


def _kohya_dense(path):
    t = load_file(path)
    out = {}
    for key in t:
        kname, _, role = key.partition(".")
        alpha = float(t[f"{kname}.alpha"]) if f"{kname}.alpha" in t else None
        if role == "lora_down.weight":
            down, up = t[key], t[f"{kname}.lora_up.weight"]
            r = down.shape[0]
            dw = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(up.shape[0], *down.shape[1:])
        elif role == "hada_w1_a":
            g = {k: t[f"{kname}.hada_{k}"] for k in ("w1_a", "w1_b", "w2_a", "w2_b")}
            r = g["w1_b"].shape[0]
            dw = (g["w1_a"] @ g["w1_b"]) * (g["w2_a"] @ g["w2_b"])
        elif role == "lokr_w1":
            r = t[f"{kname}.lokr_w2_a"].shape[1]
            dw = torch.kron(t[key], t[f"{kname}.lokr_w2_a"] @ t[f"{kname}.lokr_w2_b"])
        else:
            continue
        out[kname] = (alpha / r if alpha else 1.0) * dw  # absent or 0: scale 1, as sd-scripts reads it
    return out


def test_llm_lora_names_function_round_trip(tmp_path):
    model = llama()
    adapter = lora_adapter(model, llama_modules(), r=4, scale=1.5)
    path = af.write_foreign(adapter, tmp_path / "k.safetensors", "kohya")
    t = load_file(path)
    assert t["lora_unet_model_layers_0_self_attn_q_proj.lora_down.weight"].shape == (4, 16)
    assert t["lora_unet_model_layers_1_mlp_down_proj.lora_up.weight"].shape == (16, 4)
    assert float(t["lora_unet_model_layers_0_mlp_up_proj.alpha"]) == 6.0
    assert af.registry.formats()["kohya"].detect(path) and not af.registry.formats()["kohya"].detect(
        af.save(adapter, tmp_path / "af.safetensors"))

    # a file from another tool has no adapterfmt metadata: names resolve against the base, or fail by name
    save_file(t, tmp_path / "plain.safetensors")
    with pytest.raises(af.UnsupportedError, match="no base model") as e:
        af.read_foreign(tmp_path / "plain.safetensors")
    assert "lora_unet_model_layers_1_mlp_gate_proj" in str(e.value)
    back = af.read_foreign(tmp_path / "plain.safetensors", base=model)
    dense = {m: _kohya_dense(tmp_path / "plain.safetensors")["lora_unet_" + m.replace(".", "_")]
             for m in adapter.modules}
    check_function(model, back, dense)
    assert_same_tensors(back.tensors(), adapter.tensors())
    # kohya -> adapterfmt -> kohya: the same tensors (the metadata gains the module map)
    af.convert(tmp_path / "plain.safetensors", tmp_path / "a.safetensors", base=model)
    again = af.write_foreign(af.load(tmp_path / "a.safetensors"), tmp_path / "k2.safetensors", "kohya")
    assert_same_tensors(load_file(again), t)
    # our own file reads back without a base, through its metadata
    assert_same_tensors(af.read_foreign(path).tensors(), adapter.tensors())


def _pipe_adapter(model: Pipe) -> af.Adapter:
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return 0.3 * torch.randn(*shape, generator=g)

    modules = {
        "unet.down_blocks.0": af.lowrank_entry([6, 4, 3, 3], 0.75),
        "unet.proj_out": {"kind": "hadamard", "shape": [8, 24], "params": {"scale": 2.0}},
        "text_encoder.text_model.1": {"kind": "kronecker", "shape": [16, 16], "params": {"scale": 0.5}},
    }
    tensors = {"unet.down_blocks.0.lora_A": rnd(2, 4, 3, 3), "unet.down_blocks.0.lora_B": rnd(6, 2, 1, 1),
               "unet.proj_out.hada_w1_a": rnd(8, 3), "unet.proj_out.hada_w1_b": rnd(3, 24),
               "unet.proj_out.hada_w2_a": rnd(8, 3), "unet.proj_out.hada_w2_b": rnd(3, 24),
               "text_encoder.text_model.1.lokr_w1": rnd(4, 2), "text_encoder.text_model.1.lokr_w2_a": rnd(4, 2),
               "text_encoder.text_model.1.lokr_w2_b": rnd(2, 8)}
    return af.Adapter(af.new_manifest("lora", modules), tensors)


def test_unet_text_encoder_conv_loha_lokr(tmp_path):
    model = Pipe()
    adapter = _pipe_adapter(model)
    path = af.write_foreign(adapter, tmp_path / "k.safetensors", "kohya")
    t = load_file(path)
    assert {k.partition(".")[0] for k in t} == {"lora_unet_down_blocks_0", "lora_unet_proj_out",
                                                 "lora_te_text_model_1"}
    assert float(t["lora_unet_down_blocks_0.alpha"]) == 1.5 and float(t["lora_te_text_model_1.alpha"]) == 1.0
    save_file(t, tmp_path / "plain.safetensors")
    back = af.read_foreign(tmp_path / "plain.safetensors", base=model)
    assert {m: e["kind"] for m, e in back.modules.items()} == {m: e["kind"] for m, e in adapter.modules.items()}
    dense = _kohya_dense(tmp_path / "plain.safetensors")
    check_function(model, back, {"unet.down_blocks.0": dense["lora_unet_down_blocks_0"],
                                 "unet.proj_out": dense["lora_unet_proj_out"],
                                 "text_encoder.text_model.1": dense["lora_te_text_model_1"]})
    assert_same_tensors(back.tensors(), adapter.tensors())
    assert_same_tensors(load_file(af.write_foreign(back, tmp_path / "k2.safetensors", "kohya")), t)


def test_ambiguous_and_unknown_names_are_listed(tmp_path):
    model = Pipe()
    model.unet.down = nn.Module()
    model.unet.down.blocks_0 = nn.Conv2d(4, 6, 3)  # flattens to down_blocks_0 as well
    save_file(load_file(af.write_foreign(_pipe_adapter(Pipe()), tmp_path / "k.safetensors", "kohya")),
              tmp_path / "plain.safetensors")
    with pytest.raises(af.UnsupportedError, match=r"lora_unet_down_blocks_0 \(unet.down_blocks.0 or unet.down.blocks_0"):
        af.read_foreign(tmp_path / "plain.safetensors", base=model)
    t = load_file(tmp_path / "plain.safetensors")
    t["lora_unet_proj_out.dora_scale"] = torch.ones(8)
    t["lora_unet_mid_block.lora_down.weight"] = torch.ones(2, 4)
    save_file(t, tmp_path / "odd.safetensors")
    with pytest.raises(af.UnsupportedError, match="cannot place") as e:
        af.read_foreign(tmp_path / "odd.safetensors", base=model)
    assert "lora_unet_proj_out.dora_scale" in str(e.value)
    assert "lora_unet_mid_block (lora_down or lora_up missing)" in str(e.value)


def test_unrepresentable_adapters_are_refused_with_names(tmp_path):
    model = llama()
    plain = lora_adapter(model, llama_modules((0,), ("q_proj", "v_proj")))
    m = "model.layers.0.self_attn.v_proj"
    dora = af.Adapter(plain.manifest, {**plain.tensors(), f"{m}.magnitude": torch.ones(16)})
    with pytest.raises(af.UnsupportedError, match=r"v_proj \(roles lora_A, lora_B, magnitude\)"):
        af.write_foreign(dora, tmp_path / "x.safetensors", "kohya")
    vec = af.Adapter(af.new_manifest("ia3", {m: {"kind": "vector", "shape": [8, 16], "params": {"op": "scale"}}}),
                     {f"{m}.vector": torch.ones(8)})
    with pytest.raises(af.UnsupportedError, match=r"v_proj \(kind vector\)"):
        af.write_foreign(vec, tmp_path / "x.safetensors", "kohya")
    assert not (tmp_path / "x.safetensors").exists()


class Tiny(nn.Module):
    """Linear -> 3x3 conv -> linear, the module kinds LyCORIS adapts."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.conv, self.fc2 = nn.Linear(16, 24), nn.Conv2d(4, 8, 3, padding=1), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.fc1(x).view(x.shape[0], 4, 2, 3))
        return self.fc2(h.flatten(1)[:, :32])


@pytest.fixture
def lycoris_net(monkeypatch, tmp_path):
    """``make(algo, **kw)``: a LyCORIS network (kohya ``lora_unet_`` names, linear alpha 2 != dim 4) on a
    fresh :class:`Tiny`, its weights perturbed, saved by LyCORIS; returns the file's path."""
    from lycoris import LycorisNetwork, create_lycoris

    for attr in ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX"):
        monkeypatch.setattr(LycorisNetwork, attr, getattr(LycorisNetwork, attr))  # restored after the test
    preset = tmp_path / "preset.toml"
    preset.write_text('target_module = ["Linear", "Conv2d"]\nlora_prefix = "lora_unet"\n')

    def make(algo: str, **kw) -> Path:
        net = create_lycoris(Tiny(), 1.0, linear_dim=4, linear_alpha=2.0, algo=algo, preset=str(preset), **kw)
        net.apply_to()  # registers the modules, so that they are saved
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        net.save_weights(str(tmp_path / f"{algo}.safetensors"), torch.float32, {})
        return tmp_path / f"{algo}.safetensors"

    return make


def _lycoris_out(path: Path, x: torch.Tensor) -> torch.Tensor:
    """Tiny's output with the file at ``path`` loaded and applied by LyCORIS."""
    from lycoris.wrapper import create_lycoris_from_weights

    model = Tiny()
    net, _ = create_lycoris_from_weights(1.0, str(path), model)
    assert len(net.loras) == 3
    net.apply_to()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("algo, kw, kind, scale", [
    ("locon", {}, "lowrank", 0.5),
    ("loha", {}, "hadamard", 0.5),
    ("lokr", {"full_matrix": True, "factor": 4}, "kronecker", 1.0),  # two full factors: LyCORIS's scale is 1
])
def test_lycoris_files_convert_and_round_trip(tmp_path, lycoris_net, algo, kw, kind, scale):
    src = lycoris_net(algo, **kw)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    expected = _lycoris_out(src, x)
    assert (expected - Tiny()(x)).abs().max() > 1e-2
    af.convert(src, tmp_path / "a.safetensors", base=Tiny())
    ours = af.load(tmp_path / "a.safetensors")
    assert {(e["kind"], e["params"]["scale"]) for e in ours.modules.values()} == {(kind, scale)}
    model = Tiny()
    af.attach(model, ours)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)
    # back to kohya: every key LyCORIS wrote (alphas included), the same values, and LyCORIS loads it
    back = af.write_foreign(ours, tmp_path / "k.safetensors", "kohya")
    assert_same_tensors(load_file(back), load_file(src))
    torch.testing.assert_close(_lycoris_out(back, x), expected, atol=ATOL, rtol=0)


def test_full_factor_lokr_from_elsewhere_gets_an_alpha_lycoris_loads(tmp_path, lycoris_net):
    ours = af.read_foreign(lycoris_net("lokr", full_matrix=True, factor=4), base=Tiny())
    fresh = af.Adapter(af.new_manifest("lokr", ours.modules), ours.tensors())  # no kohya provenance
    t = load_file(af.write_foreign(fresh, tmp_path / "k.safetensors", "kohya"))
    assert {k for k in t if k.endswith(".alpha")} == {f"lora_unet_{m}.alpha" for m in ("fc1", "conv", "fc2")}
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    model = Tiny()
    af.attach(model, ours)
    with torch.no_grad():
        torch.testing.assert_close(_lycoris_out(tmp_path / "k.safetensors", x), model(x), atol=ATOL, rtol=0)


def test_alpha_zero_is_scale_one_and_scale_zero_is_refused(tmp_path, lycoris_net):
    t = load_file(lycoris_net("locon"))
    t["lora_unet_fc1.alpha"] = torch.tensor(0.0)  # sd-scripts and LyCORIS: alpha 0 means alpha = r
    save_file(t, tmp_path / "zero.safetensors")
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    ours = af.read_foreign(tmp_path / "zero.safetensors", base=Tiny())
    assert ours.modules["fc1"]["params"]["scale"] == 1.0
    model = Tiny()
    af.attach(model, ours)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _lycoris_out(tmp_path / "zero.safetensors", x), atol=ATOL, rtol=0)
    assert_same_tensors(load_file(af.write_foreign(ours, tmp_path / "k.safetensors", "kohya")), t)
    ours.modules["fc2"]["params"]["scale"] = 0.0
    with pytest.raises(af.UnsupportedError, match=r"fc2 \(scale 0: alpha 0 means scale 1"):
        af.write_foreign(ours, tmp_path / "k0.safetensors", "kohya")


def test_lokr_pairs_of_different_inner_dims_are_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 4), "lokr_w2_a": (6, 3), "lokr_w2_b": (3, 4)}
    t = {f"lora_unet_fc1.{role}": torch.randn(*shape, generator=g) for role, shape in shapes.items()}
    t["lora_unet_fc1.alpha"] = torch.tensor(2.0)
    save_file(t, tmp_path / "k.safetensors")
    with pytest.raises(af.UnsupportedError, match=r"lora_unet_fc1 \(LoKr pairs of different inner dims \[2, 3\]\)"):
        af.read_foreign(tmp_path / "k.safetensors", base=Tiny())
