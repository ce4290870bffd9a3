"""diffusers LoRA codec: unet./text_encoder. keys, lora_A/lora_B (or legacy lora.down/lora.up), scales from
``lora_adapter_metadata`` (or older ``.alpha`` keys).

The dense reference uses diffusers' (PEFT's) math on the written file: dW = alpha / r * B @ A (conv: over the
flattened input dims), r and alpha per module from PEFT's own ``LoraConfig`` built from the metadata as
diffusers builds it (``get_pattern_key``), or from ``.alpha`` keys (absent: alpha = r). diffusers itself
(a tiny ``UNet2DConditionModel`` with ``StableDiffusionLoraLoaderMixin``) is the oracle for files it saves
and for files written here.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers_formats import ATOL, Pipe, assert_same_tensors, check_function, llama, llama_modules, lora_adapter
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import adapterfmt as af


def _adapter(scale_conv=0.5):
    g = torch.Generator().manual_seed(2)
    modules = {"unet.down_blocks.0": af.lowrank_entry([6, 4, 3, 3], scale_conv),
               "unet.proj_out": af.lowrank_entry([8, 24], 1.0),
               "text_encoder.text_model.1": af.lowrank_entry([16, 16], 3.0)}
    shapes = {"unet.down_blocks.0": ((2, 4, 3, 3), (6, 2, 1, 1)), "unet.proj_out": ((3, 24), (8, 3)),
              "text_encoder.text_model.1": ((2, 16), (16, 2))}
    tensors = {f"{m}.{role}": 0.3 * torch.randn(*s, generator=g)
               for m, (sa, sb) in shapes.items() for role, s in (("lora_A", sa), ("lora_B", sb))}
    return af.Adapter(af.new_manifest("lora", modules), tensors)


def _metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _dense(path):
    t = load_file(path)
    meta = _metadata(path).get("lora_adapter_metadata")
    fields = json.loads(meta) if meta else None
    out = {}
    for key in t:
        for down, up in ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight")):
            if key.endswith(down):
                m = key.removesuffix(down)
                a, b = t[key], t[m + up]
                r = a.shape[0]
                if fields is None:
                    scale = float(t[f"{m}.alpha"]) / r if f"{m}.alpha" in t else 1.0
                else:  # what diffusers does: LoraConfig(**the component's fields), PEFT's pattern lookup
                    comp, _, rel = m.partition(".")
                    cfg = LoraConfig(**{k.removeprefix(comp + "."): v for k, v in fields.items()
                                        if k.startswith(comp + ".")})
                    assert cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), rel), cfg.r) == r
                    scale = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), rel), cfg.lora_alpha) / r
                out[m] = scale * (b.reshape(b.shape[0], r) @ a.reshape(r, -1)).reshape(b.shape[0], *a.shape[1:])
    return out


def test_write_read_function_and_round_trip(tmp_path):
    model = Pipe()
    adapter = _adapter()
    path = af.write_foreign(adapter, tmp_path / "pytorch_lora_weights.safetensors", "diffusers")
    t = load_file(path)
    assert not any(k.endswith(".alpha") for k in t)  # diffusers' load_lora_weights refuses such keys
    fields = json.loads(_metadata(path)["lora_adapter_metadata"])
    assert fields["unet.r"] == 2 and fields["unet.lora_alpha"] == 1.0 and fields["unet.alpha_pattern"] == {
        r"^proj_out": 3}
    assert fields["text_encoder.target_modules"] == ["text_model.1"]
    from adapterfmt.verbs.conversion import detect_format

    assert detect_format(path) == "diffusers"
    back = af.read_foreign(path, base=model)
    check_function(model, back, _dense(path))
    assert_same_tensors(back.tensors(), adapter.tensors())
    af.convert(path, tmp_path / "a.safetensors")
    again = af.write_foreign(af.load(tmp_path / "a.safetensors"), tmp_path / "d2.safetensors", "diffusers")
    assert_same_tensors(load_file(again), t)
    assert _metadata(again) == _metadata(path)
    # all scales 1 and no source metadata: none written (diffusers' default is alpha = r)
    ones = af.Adapter(af.new_manifest("lora", {m: {**e, "params": {"scale": 1.0}} for m, e in adapter.modules.items()}),
                      adapter.tensors())
    assert "lora_adapter_metadata" not in _metadata(af.write_foreign(ones, tmp_path / "d1.safetensors", "diffusers"))


def test_legacy_keys_and_alpha_keys_become_metadata(tmp_path):
    model = Pipe()
    t = load_file(af.write_foreign(_adapter(), tmp_path / "d.safetensors", "diffusers"))
    legacy = {k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): v
              for k, v in t.items()}
    legacy["unet.down_blocks.0.alpha"] = torch.tensor(1.0)
    legacy["text_encoder.text_model.1.alpha"] = torch.tensor(6.0)
    legacy["unet.proj_out.alpha"] = torch.tensor(3.0)  # an explicit alpha = r
    save_file(legacy, tmp_path / "legacy.safetensors")
    back = af.read_foreign(tmp_path / "legacy.safetensors", base=model)
    check_function(model, back, _dense(tmp_path / "legacy.safetensors"))
    out = af.write_foreign(back, tmp_path / "l2.safetensors", "diffusers")
    assert_same_tensors(load_file(out), {k: v for k, v in legacy.items() if not k.endswith(".alpha")})
    check_function(model, af.read_foreign(out, base=model), _dense(tmp_path / "legacy.safetensors"))


def test_refusals_name_what_is_in_the_way(tmp_path):
    model = llama()
    with pytest.raises(af.UnsupportedError, match="outside them: model.layers.0.self_attn.q_proj"):
        af.write_foreign(lora_adapter(model, llama_modules((0,), ("q_proj",))), tmp_path / "x.safetensors", "diffusers")
    t = load_file(af.write_foreign(_adapter(), tmp_path / "d.safetensors", "diffusers"))
    t["unet.proj_out.lora_magnitude_vector"] = torch.ones(8)
    t["vae.decoder.lora_A.weight"] = torch.ones(2, 4)
    del t["text_encoder.text_model.1.lora_B.weight"]
    save_file(t, tmp_path / "odd.safetensors")
    with pytest.raises(af.UnsupportedError, match="cannot place") as e:
        af.read_foreign(tmp_path / "odd.safetensors", "diffusers")
    for name in ("unet.proj_out.lora_magnitude_vector", "vae.decoder.lora_A.weight", "text_encoder.text_model.1 ("):
        assert name in str(e.value)


# ----- diffusers itself as the oracle -------------------------------------------------------------------------
def _unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=2, attention_head_dim=2)


def _pipe_class():
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    class UnetPipe(StableDiffusionLoraLoaderMixin):
        """The least of a pipeline that diffusers' ``load_lora_weights`` / ``save_lora_weights`` work with."""

        hf_device_map = None

        def __init__(self, unet: nn.Module) -> None:
            self.unet, self.text_encoder, self.components = unet, None, {"unet": unet}

    return UnetPipe


class Holder(nn.Module):
    """Our side: a module holding the unet, as the pipeline names its modules (``unet.<path>``)."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = _unet()


def _run(unet: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 11]),
                    torch.randn(2, 5, 8, generator=g)).sample


def _diffusers_out(path) -> torch.Tensor:
    unet = _unet()
    _pipe_class()(unet).load_lora_weights(str(path))
    return _run(unet)


def _ours_out(adapter: af.Adapter) -> torch.Tensor:
    holder = Holder()
    af.attach(holder, adapter)
    return _run(holder.unet)


@pytest.mark.parametrize("rslora", [False, True])
def test_diffusers_saved_lora_keeps_its_alphas_and_round_trips(tmp_path, rslora):
    from peft.utils import get_peft_model_state_dict

    unet = _unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=6, use_rslora=rslora, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"],
                                rank_pattern={"conv1": 2},
                                alpha_pattern={"to_k": 3, "^down_blocks.0.resnets.0.conv1": 5}))
    _pipe_class().save_lora_weights(tmp_path / "src", unet_lora_layers=get_peft_model_state_dict(unet),
                                    unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    src = tmp_path / "src" / "pytorch_lora_weights.safetensors"
    expected = _diffusers_out(src)
    assert (expected - _run(_unet())).abs().max() > 1e-2
    af.convert(src, tmp_path / "a.safetensors", base=Holder())
    ours = af.load(tmp_path / "a.safetensors")
    assert len({e["params"]["scale"] for e in ours.modules.values()}) == 4  # 6/4, 3/4, 5/2, 6/2 (or over sqrt r)
    torch.testing.assert_close(_ours_out(ours), expected, atol=ATOL, rtol=0)
    # back to diffusers: the same tensors and metadata
    af.convert(tmp_path / "a.safetensors", tmp_path / "back.safetensors", to="diffusers")
    assert_same_tensors(load_file(tmp_path / "back.safetensors"), load_file(src))
    assert _metadata(tmp_path / "back.safetensors") == _metadata(src)


def test_written_diffusers_file_loads_in_diffusers_with_our_outputs(tmp_path):
    holder = Holder()
    modules = {"unet.conv_in": [2, (4, 4, 3, 3)], "unet.down_blocks.0.attentions.0.proj_in": [3, (4, 4, 1, 1)],
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": [2, (4, 8)],
               "unet.up_blocks.1.resnets.0.conv1": [3, (4, 12, 3, 3)]}
    scales = [0.7, 1.0, 2.5, 1 / 3]
    g = torch.Generator().manual_seed(3)
    tensors, entries = {}, {}
    for (m, (r, shape)), scale in zip(modules.items(), scales):
        assert tuple(holder.get_submodule(m).weight.shape) == shape
        entries[m] = af.lowrank_entry(list(shape), scale)
        tensors[f"{m}.lora_A"] = 0.3 * torch.randn(r, *shape[1:], generator=g)
        tensors[f"{m}.lora_B"] = 0.3 * torch.randn(shape[0], r, *[1] * (len(shape) - 2), generator=g)
    af.save(af.Adapter(af.new_manifest("lora", entries), tensors), tmp_path / "a.safetensors")
    af.convert(tmp_path / "a.safetensors", tmp_path / "d.safetensors", to="diffusers")
    assert not any(k.endswith(".alpha") for k in load_file(tmp_path / "d.safetensors"))
    expected = _ours_out(af.load(tmp_path / "a.safetensors"))
    assert (expected - _run(_unet())).abs().max() > 1e-2
    torch.testing.assert_close(_diffusers_out(tmp_path / "d.safetensors"), expected, atol=ATOL, rtol=0)


def _with_fields(tmp_path, edit):
    """A file written here, its metadata fields passed through ``edit``."""
    path = af.write_foreign(_adapter(), tmp_path / "d.safetensors", "diffusers")
    fields = json.loads(_metadata(path)["lora_adapter_metadata"])
    edit(fields)
    save_file(load_file(path), tmp_path / "odd.safetensors", {"lora_adapter_metadata": json.dumps(fields)})
    return tmp_path / "odd.safetensors"


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.update({"unet.use_dora": True}), r"unet.use_dora=True"),
    (lambda f: f.update({"unet.init_lora_weights": "pissa"}), r"unet.init_lora_weights='pissa' \(PEFT rewrites"),
    (lambda f: f.update({"unet.some_new_field": 2}), r"unet.some_new_field=2"),
    (lambda f: f.update({"unet.lora_alpha": "6"}), r"unet.lora_alpha='6' \(not a number\)"),
    (lambda f: f.update({"unet.alpha_pattern": {"(": 2}}), r"unet.alpha_pattern=\{'\(': 2\} \(not an object"),
    (lambda f: f.update({"text_encoder.target_modules": ["q_proj"]}),
     r"text_encoder.target_modules=\['q_proj'\] does not list text_model.1"),
    (lambda f: f.update({"unet.r": 4}), r"ranks differ .*unet.down_blocks.0 \(rank 2, the config gives 4\)"),
    (lambda f: [f.pop(k) for k in list(f) if k.startswith("unet.")],  # PEFT's defaults: r = 8
     r"unet.down_blocks.0 \(rank 2, the config gives 8\)"),
])
def test_metadata_fields_that_cannot_be_held_are_refused(tmp_path, edit, message):
    with pytest.raises(af.UnsupportedError, match=message):
        af.read_foreign(_with_fields(tmp_path, edit), "diffusers")


def test_metadata_and_alpha_keys_together_are_refused(tmp_path):
    path = af.write_foreign(_adapter(), tmp_path / "d.safetensors", "diffusers")
    t = load_file(path)
    t["unet.proj_out.alpha"] = torch.tensor(3.0)
    save_file(t, tmp_path / "both.safetensors", _metadata(path))
    with pytest.raises(af.UnsupportedError, match=r"both lora_adapter_metadata and .alpha keys \(unet.proj_out\)"):
        af.read_foreign(tmp_path / "both.safetensors", "diffusers")
