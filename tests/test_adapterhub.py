"""AdapterHub ``adapters`` bottleneck folders (Houlsby, Pfeiffer) built in adapters' own layout on a tiny
transformers Llama: read by ``adapter convert``, applied as kind ``bottleneck`` and compared with a
transcription of adapters' own forward; written back in that layout; refusals in one line.

``adapters`` 1.3 pins transformers 4.57, so it cannot run here; the reference below transcribes, for
``layer_norm = None`` (Llama), ``Adapter.pre_forward`` / ``Adapter.forward`` / ``Adapter.post_forward``
(adapters/methods/modeling.py), ``BottleneckLayer.bottleneck_layer_forward`` (adapters/methods/bottleneck.py)
and ``LlamaDecoderLayerWithAdapters.forward`` (adapters/models/llama/modeling_llama.py)."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F
from helpers_peft import build, logits
from helpers_spec import invoke
from safetensors.torch import load_file, save_file

import adapterfmt as af
from adapterfmt.verbs.conversion import detect_format

ATOL = 1e-5
NAME = "task"
HOULSBY = {"mh_adapter": True, "output_adapter": True, "original_ln_before": False, "original_ln_after": True,
           "residual_before_ln": True, "adapter_residual_before_ln": False, "ln_before": False, "ln_after": False,
           "non_linearity": "swish", "reduction_factor": 4, "scaling": 1.0, "is_parallel": False,
           "use_gating": False, "phm_layer": False, "inv_adapter": None, "cross_adapter": False, "dropout": 0.0}
PFEIFFER = {**HOULSBY, "mh_adapter": False, "original_ln_before": True, "non_linearity": "relu", "scaling": 0.5}
ACT = {"swish": F.silu, "relu": F.relu}


def make_folder(tmp_path, cfg, seed=0):
    """A folder as ``model.save_adapter(..., use_safetensors=True)`` writes it for LlamaForCausalLM."""
    gen = torch.Generator().manual_seed(seed)
    tensors, locs = {}, [loc for loc, on in (("attention", cfg["mh_adapter"]), ("output", cfg["output_adapter"])) if on]
    for n in range(2):
        for loc in locs:
            p = f"model.layers.{n}.{loc}_adapters.adapters.{NAME}"
            tensors |= {f"{p}.adapter_down.0.weight": 0.3 * torch.randn(4, 16, generator=gen),
                        f"{p}.adapter_down.0.bias": 0.3 * torch.randn(4, generator=gen),
                        f"{p}.adapter_up.weight": 0.3 * torch.randn(16, 4, generator=gen),
                        f"{p}.adapter_up.bias": 0.3 * torch.randn(16, generator=gen)}
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file(tensors, folder / "adapter.safetensors")
    meta = {"config": cfg, "hidden_size": 16, "model_class": "LlamaForCausalLM", "model_name": None,
            "model_type": "llama", "name": NAME, "version": "adapters.1.3.0"}
    (folder / "adapter_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return folder, tensors


def reference(cfg, tensors):
    """A tiny Llama whose decoder layers run adapters' forward with these weights (module docstring)."""
    model = build("llama")

    def adapter_layer(n, loc, h, r):  # bottleneck_layer_forward(h, residual_input=r, layer_norm=None)
        p = f"model.layers.{n}.{loc}_adapters.adapters.{NAME}"
        if f"{p}.adapter_up.bias" not in tensors:
            return h + r  # no adapter here: the residual only
        x, residual = h, h  # pre_forward: residual_before_ln=True -> residual = hidden_states
        if cfg["original_ln_before"]:
            x = h + r  # no layer_norm: hidden_states = hidden_states + input_tensor
        down = ACT[cfg["non_linearity"]](F.linear(x, tensors[f"{p}.adapter_down.0.weight"], tensors[f"{p}.adapter_down.0.bias"]))
        up = F.linear(down, tensors[f"{p}.adapter_up.weight"], tensors[f"{p}.adapter_up.bias"]) * cfg["scaling"]
        out = up + residual  # forward: adapter_residual_before_ln False, no ln_after
        return out + r  # post_forward: original_ln_after, no layer_norm

    def layer_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                      position_embeddings=None, **kwargs):
        residual = hidden_states
        h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                              position_ids=position_ids, cache=cache, use_cache=use_cache,
                              position_embeddings=position_embeddings, **kwargs)
        h = adapter_layer(self.self_attn.layer_idx, "attention", h, residual)
        residual = h
        h = self.mlp(self.post_attention_layernorm(h))
        return adapter_layer(self.self_attn.layer_idx, "output", h, residual)

    for layer in model.model.layers:
        layer.forward = types.MethodType(layer_forward, layer)
    return model


@pytest.mark.parametrize("cfg", [HOULSBY, PFEIFFER], ids=["houlsby", "pfeiffer"])
def test_bottleneck_folder_reads_applies_as_adapters_does_and_writes_back(tmp_path, cfg):
    folder, tensors = make_folder(tmp_path, cfg)
    ids = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(0))
    want = logits(reference(cfg, tensors), ids)
    res = invoke("convert", str(folder), str(tmp_path / "a.safetensors"))
    assert res.exit_code == 0, res.stderr
    adapter = af.load(tmp_path / "a.safetensors")
    assert detect_format(folder) == "adapterhub"
    expected = {"model.layers.1.mlp", "model.layers.1.self_attn.o_proj"} if cfg is HOULSBY else {"model.layers.1"}
    assert expected <= set(adapter.modules) and {e["kind"] for e in adapter.modules.values()} == {"bottleneck"}
    model = build("llama")
    base_out = logits(model, ids)
    af.attach(model, adapter)
    got = logits(model, ids)
    assert (got - want).abs().max() <= ATOL < (base_out - want).abs().max()

    base = build("llama")
    af.write_foreign(adapter, tmp_path / "back", "adapterhub", base=base)
    back = load_file(tmp_path / "back" / "adapter.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    meta = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert meta["version"] == "adapters.1.3.0" and meta["name"] == NAME and meta["hidden_size"] == 16
    assert {k: meta["config"][k] for k in cfg} == {**cfg, "reduction_factor": 4.0}
    res = invoke("convert", str(tmp_path / "a.safetensors"), str(tmp_path / "cli"), "--to", "adapterhub")
    assert res.exit_code == 0, res.stderr
    assert load_file(tmp_path / "cli" / "adapter.safetensors").keys() == tensors.keys()


@pytest.mark.parametrize(("change", "field"), [({"is_parallel": True}, "config.is_parallel=True"),
                                               ({"use_gating": True}, "config.use_gating=True"),
                                               ({"non_linearity": "mish"}, "config.non_linearity='mish'"),
                                               ({"scaling": "learned"}, "config.scaling='learned'"),
                                               ({"mh_adapter": False}, "mh_adapter=false"),
                                               ({"architecture": "prefix_tuning"},
                                                "config.architecture 'prefix_tuning' is not supported")])
def test_unrepresentable_configs_are_refused_in_one_line(tmp_path, change, field):
    folder, _ = make_folder(tmp_path, HOULSBY)
    meta = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**meta, "config": {**HOULSBY, **change}}))
    res = invoke("convert", str(folder), str(tmp_path / "o.safetensors"))
    assert res.exit_code == 1 and field in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.safetensors").exists()


def test_a_peft_folder_is_not_taken_for_an_adapters_folder(tmp_path):
    folder, _ = make_folder(tmp_path, HOULSBY)
    meta = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**meta, "version": None, "peft_type": "LORA"}))
    assert detect_format(folder) == "peft"


@pytest.mark.parametrize("activation", ["gelu_tanh", "leaky_relu"])
def test_bottleneck_kind_is_the_spec_math(tmp_path, activation):
    """Spec 6.10.15 written out in numpy: y' = y + s * (up @ act(down @ y + down_bias) + up_bias)."""
    import numpy as np

    gen = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(5, 6)
    t = {"down": torch.randn(3, 6, generator=gen), "down_bias": torch.randn(3, generator=gen),
         "up": torch.randn(6, 3, generator=gen), "up_bias": torch.randn(6, generator=gen)}
    entry = {"kind": "bottleneck", "shape": [6], "params": {"activation": activation, "scale": 0.7}}
    af.save(af.Adapter(af.new_manifest("bottleneck", {"lin": entry}), {f"lin.{k}": v for k, v in t.items()}),
            tmp_path / "b.safetensors")
    model = torch.nn.Sequential()
    model.add_module("lin", lin)
    x = torch.randn(4, 5, generator=gen)
    y = lin(x).detach().numpy()
    n = {k: v.numpy() for k, v in t.items()}
    z = y @ n["down"].T + n["down_bias"]
    act = {"gelu_tanh": lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3))),
           "leaky_relu": lambda v: np.where(v > 0, v, 0.01 * v)}[activation]
    want = y + 0.7 * (act(z) @ n["up"].T + n["up_bias"])
    af.attach(model, af.load(tmp_path / "b.safetensors"))
    with torch.no_grad():
        assert np.abs(model(x).numpy() - want).max() <= ATOL


def test_pickle_weights_need_allow_pickle(tmp_path):
    folder, tensors = make_folder(tmp_path, HOULSBY)
    (folder / "adapter.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_adapter.bin")  # adapters' default weights file
    res = invoke("convert", str(folder), str(tmp_path / "o.safetensors"))
    assert res.exit_code == 1 and "pickle" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = invoke("convert", str(folder), str(tmp_path / "o.safetensors"), "--allow-pickle")
    assert res.exit_code == 0, res.stderr
    assert torch.equal(af.load(tmp_path / "o.safetensors").tensor("model.layers.0.mlp.up"),
                       tensors[f"model.layers.0.output_adapters.adapters.{NAME}.adapter_up.weight"])


def test_per_layer_ranks_are_written_as_a_reduction_factor_mapping(tmp_path):
    folder, _ = make_folder(tmp_path, HOULSBY)
    adapter = af.read_foreign(folder)
    tensors = {n: adapter.tensor(n) for n in adapter.tensor_names()}
    for m in ("model.layers.1.mlp", "model.layers.1.self_attn.o_proj"):  # rank 2 in layer 1
        tensors[f"{m}.down"], tensors[f"{m}.down_bias"] = tensors[f"{m}.down"][:2], tensors[f"{m}.down_bias"][:2]
        tensors[f"{m}.up"] = tensors[f"{m}.up"][:, :2]
    af.write_foreign(af.Adapter(adapter.manifest, tensors), tmp_path / "back", "adapterhub")
    meta = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert meta["config"]["reduction_factor"] == {"0": 4.0, "1": 8.0, "default": 4.0}
    tensors["model.layers.1.mlp.down"] = torch.randn(3, 16)  # two ranks in one layer: no config holds that
    tensors["model.layers.1.mlp.down_bias"], tensors["model.layers.1.mlp.up"] = torch.randn(3), torch.randn(16, 3)
    with pytest.raises(af.UnsupportedError, match=r"layer 1: adapters' config gives one rank per layer"):
        af.write_foreign(af.Adapter(adapter.manifest, tensors), tmp_path / "again", "adapterhub")
    assert not (tmp_path / "again").exists()
