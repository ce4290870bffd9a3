"""AdapterHub ``adapters`` bottleneck and prefix-tuning folders made by the real ``adapters`` 1.3
(tests/fixtures/adapterhub, written by its ``make_fixtures.py`` in a side environment: adapters pins transformers
4.57): read by ``adapter convert``, applied as kinds ``bottleneck`` / ``parallel_bottleneck`` / ``prefix`` with
adapters' recorded logits, written back in adapters' layout (tensor-identical where the source is in that
layout); refusals in one line."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers_spec import invoke
from safetensors.torch import load_file

import adapterfmt as af
from adapterfmt.verbs.conversion import detect_format

ATOL = 1e-5
FIX = Path(__file__).parent / "fixtures" / "adapterhub"
CASES = [f"{m}-{c}" for m in ("llama", "gpt2", "bert")
         for c in ("houlsby", "pfeiffer", "parallel", "parallel-attn", "parallel-both")
         if (m, c) != ("bert", "pfeiffer")]
CASES += ["roberta-houlsby", "roberta-parallel-both"]
PLACES = {"llama-houlsby": "model.layers.1.self_attn.o_proj", "llama-pfeiffer": "model.layers.1",
          "llama-parallel": "model.layers.1", "gpt2-houlsby": "transformer.h.1.attn",
          "gpt2-pfeiffer": "transformer.h.1", "bert-houlsby": "bert.encoder.layer.1.output.dense",
          "bert-parallel-attn": "bert.encoder.layer.1"}


def base(model: str) -> torch.nn.Module:
    """The base ``make_fixtures.py`` saved (``save_pretrained``), loaded here (transformers 5)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if model in ("bert", "roberta") else AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(FIX / "base" / model).float().eval()


def run(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def copy_case(tmp_path: Path, case: str = "llama-houlsby", **config: object) -> Path:
    """A copy of a fixture folder, its config fields changed."""
    folder = shutil.copytree(FIX / case, tmp_path / case)
    meta = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**meta, "config": {**meta["config"], **config}}))
    return folder


@pytest.mark.parametrize("case", CASES)
def test_adapters_folder_converts_gives_adapters_logits_and_writes_back(tmp_path, case):
    model_type = case.split("-")[0]
    expected = load_file(FIX / case / "expected.safetensors")
    assert detect_format(FIX / case) == "adapterhub"
    res = invoke("convert", str(FIX / case), str(tmp_path / "a.safetensors"), "--base", str(FIX / "base" / model_type))
    assert res.exit_code == 0, res.stderr
    adapter = af.load(tmp_path / "a.safetensors")
    kind = "parallel_bottleneck" if "parallel" in case else "bottleneck"
    assert {e["kind"] for e in adapter.modules.values()} == {kind} and PLACES.get(case, "") in {"", *adapter.modules}
    if case.endswith("both"):  # one entry per layer holds both sites, stacked: attention first
        assert all(len(e["params"]["reads"]) == 2 and adapter.tensor(f"{m}.down").shape[0] == 2
                   for m, e in adapter.modules.items())
    model = base(model_type)
    base_out = run(model, expected["ids"])
    af.attach(model, adapter)
    got = run(model, expected["ids"])
    assert (got - expected["logits"]).abs().max() <= ATOL < (base_out - expected["logits"]).abs().max()
    af.detach(model, adapter.method)
    assert torch.equal(run(model, expected["ids"]), base_out)  # the parallel form's per-call hooks are gone

    res = invoke("convert", str(tmp_path / "a.safetensors"), str(tmp_path / "back"), "--to", "adapterhub",
                 "--base", str(FIX / "base" / model_type))
    assert res.exit_code == 0, res.stderr
    source, back = load_file(FIX / case / "adapter.safetensors"), load_file(tmp_path / "back" / "adapter.safetensors")
    assert back.keys() == source.keys() and all(torch.equal(back[k], source[k]) for k in source)
    meta, want = (json.loads((f / "adapter_config.json").read_text()) for f in (tmp_path / "back", FIX / case))
    assert {k: meta[k] for k in ("model_type", "name", "hidden_size", "model_class")} == \
        {k: want[k] for k in ("model_type", "name", "hidden_size", "model_class")}
    fields = ("mh_adapter", "output_adapter", "original_ln_before", "is_parallel", "non_linearity", "scaling",
              "reduction_factor", "leave_out")
    assert {k: meta["config"][k] for k in fields} == {k: want["config"][k] for k in fields}


@pytest.mark.parametrize(("case", "change", "field"), [
    ("llama-houlsby", {"use_gating": True}, "config.use_gating=True"),
    ("llama-houlsby", {"non_linearity": "mish"}, "config.non_linearity='mish'"),
    ("llama-houlsby", {"scaling": "learned"}, "config.scaling='learned'"),
    ("llama-houlsby", {"mh_adapter": False}, "mh_adapter=false"),
    ("llama-houlsby", {"ln_after": True}, "config.ln_after=True"),
    ("llama-houlsby", {"architecture": "lora"}, "config.architecture 'lora' is not supported"),
    ("llama-mam", {"configs": [{"architecture": "lora"}]}, "config.architecture 'lora' is not supported"),
    ("llama-pfeiffer", {"residual_before_ln": False}, "config.residual_before_ln=False with original_ln_before"),
    ("llama-parallel", {"mh_adapter": True}, "config.mh_adapter=true but layer 'model.layers.0' has no weights"),
    ("bert-pfeiffer", {}, "config.original_ln_before=true on bert"),
    ("bert-prefix", {}, "prefix tuning on bert cannot be represented"),
    ("llama-prefix", {"use_gating": True}, "config.use_gating=True"),
    ("llama-prefix", {"leave_out": [1]}, "config.leave_out=[1]"),
    ("llama-prefix", {}, "pass --base")])
def test_unrepresentable_configs_are_refused_in_one_line(tmp_path, case, change, field):
    folder = copy_case(tmp_path, case, **change)
    res = invoke("convert", str(folder), str(tmp_path / "o.safetensors"), "--allow-pickle")
    assert res.exit_code == 1 and field in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("case", ["llama-prefix", "gpt2-prefix", "gpt2-prefix-flat"])
def test_adapters_prefix_converts_gives_adapters_logits_and_writes_back_flat(tmp_path, case):
    """adapters' prefix (MLP form, or ejected flat) is kind prefix with positions from 0; written back flat."""
    model_type = case.split("-")[0]
    expected, where = load_file(FIX / case / "expected.safetensors"), str(FIX / "base" / model_type)
    res = invoke("convert", str(FIX / case), str(tmp_path / "a.safetensors"), "--base", where, "--allow-pickle")
    assert res.exit_code == 0, res.stderr
    adapter = af.load(tmp_path / "a.safetensors")
    ((stack, entry),) = adapter.modules.items()
    assert (stack, entry["kind"], entry["params"]) == ({"llama": "model", "gpt2": "transformer"}[model_type], "prefix",
                                                       {"positions": "from_zero"})
    model = base(model_type)
    base_out = run(model, expected["ids"])
    af.attach(model, adapter)
    with torch.no_grad():
        masked = model(expected["ids"], attention_mask=torch.ones_like(expected["ids"])).logits
    for got in (run(model, expected["ids"]), masked):
        assert (got - expected["logits"]).abs().max() <= ATOL < (base_out - expected["logits"]).abs().max()

    res = invoke("convert", str(tmp_path / "a.safetensors"), str(tmp_path / "back"), "--to", "adapterhub",
                 "--base", where)
    assert res.exit_code == 0, res.stderr
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["config"]["flat"] is True
    again = af.read_foreign(tmp_path / "back", base=where)
    assert all(torch.equal(again.tensor(n), adapter.tensor(n)) for n in adapter.tensor_names())
    if case.endswith("flat"):  # adapters' own layout of an ejected prefix: tensor-identical
        source = torch.load(FIX / case / "pytorch_adapter.bin", weights_only=True)
        back = load_file(tmp_path / "back" / "adapter.safetensors")
        assert back.keys() == source.keys() and all(torch.equal(back[k], source[k]) for k in source)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_adapters_mam_union_converts_gives_adapters_logits_and_writes_back(tmp_path, model_type):
    """MAMConfig (a union of prefix tuning and a parallel bottleneck): one adapter holding a prefix and
    parallel_bottleneck entries; written back as a union whose bottleneck tensors are the source's."""
    case, where = f"{model_type}-mam", str(FIX / "base" / model_type)
    expected = load_file(FIX / case / "expected.safetensors")
    res = invoke("convert", str(FIX / case), str(tmp_path / "a.safetensors"), "--base", where, "--allow-pickle")
    assert res.exit_code == 0, res.stderr
    adapter = af.load(tmp_path / "a.safetensors")
    assert sorted({e["kind"] for e in adapter.modules.values()}) == ["parallel_bottleneck", "prefix"]
    model = base(model_type)
    base_out = run(model, expected["ids"])
    af.attach(model, adapter)
    got = run(model, expected["ids"])
    assert (got - expected["logits"]).abs().max() <= ATOL < (base_out - expected["logits"]).abs().max()
    res = invoke("convert", str(tmp_path / "a.safetensors"), str(tmp_path / "back"), "--to", "adapterhub",
                 "--base", where)
    assert res.exit_code == 0, res.stderr
    meta = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert meta["config"]["architecture"] == "union"
    assert [c.get("architecture") for c in meta["config"]["configs"]] == ["prefix_tuning", None]
    source = torch.load(FIX / case / "pytorch_adapter.bin", weights_only=True)
    back = load_file(tmp_path / "back" / "adapter.safetensors")
    bottleneck = {k for k in source if ".prefix_tuning." not in k}
    assert bottleneck <= back.keys() and all(torch.equal(back[k], source[k]) for k in bottleneck)
    again = af.read_foreign(tmp_path / "back", base=where)
    assert all(torch.equal(again.tensor(n), adapter.tensor(n)) for n in adapter.tensor_names())


def test_a_peft_form_prefix_is_not_written_as_an_adapters_prefix(tmp_path):
    adapter = af.read_foreign(FIX / "gpt2-prefix", base=FIX / "base" / "gpt2", allow_pickle=True)
    entry = {**adapter.modules["transformer"], "params": {}}  # PEFT's positions (after the prefix)
    peft_form = af.Adapter(af.new_manifest("prefix_tuning", {"transformer": entry}),
                           {n: adapter.tensor(n) for n in adapter.tensor_names()})
    with pytest.raises(af.UnsupportedError, match=r"adapters numbers the real tokens from 0 .*'after_prefix'"):
        af.write_foreign(peft_form, tmp_path / "o", "adapterhub")
    assert not (tmp_path / "o").exists()


def test_other_model_types_are_refused(tmp_path):
    folder = copy_case(tmp_path)
    meta = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**meta, "model_type": "t5"}))
    with pytest.raises(af.UnsupportedError, match=r"model_type 't5' is not supported \(supported: llama, gpt2, bert, "
                                                  r"roberta\)"):
        af.read_foreign(folder)


def test_a_peft_folder_is_not_taken_for_an_adapters_folder(tmp_path):
    folder = copy_case(tmp_path)
    meta = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**meta, "version": None, "peft_type": "LORA"}))
    assert detect_format(folder) == "peft"


def test_writer_refuses_what_one_adapters_config_cannot_hold(tmp_path):
    adapter = af.read_foreign(FIX / "llama-houlsby")
    one = {m: e for m, e in adapter.modules.items() if m != "model.layers.1.mlp"}  # layer 1 lacks its output site
    tensors = {n: adapter.tensor(n) for n in adapter.tensor_names() if not n.startswith("model.layers.1.mlp.")}
    with pytest.raises(af.UnsupportedError, match=r"the same locations in every layer"):
        af.write_foreign(af.Adapter(af.new_manifest("bottleneck", one), tensors), tmp_path / "o", "adapterhub")
    mixed = af.read_foreign(FIX / "llama-pfeiffer")
    same = {m: {**e, "params": one["model.layers.0.mlp"]["params"]} for m, e in mixed.modules.items()}
    both = af.Adapter(af.new_manifest("bottleneck", {**one, **same}),
                      {**tensors, **{n: mixed.tensor(n) for n in mixed.tensor_names()}})
    with pytest.raises(af.UnsupportedError, match=r"one form for all bottlenecks: the adapter mixes ln_before and "
                                                  r"sequential"):
        af.write_foreign(both, tmp_path / "o", "adapterhub")
    assert not (tmp_path / "o").exists()


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
    folder = copy_case(tmp_path)
    tensors = load_file(folder / "adapter.safetensors")
    (folder / "adapter.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_adapter.bin")  # adapters' default weights file
    res = invoke("convert", str(folder), str(tmp_path / "o.safetensors"))
    assert res.exit_code == 1 and "pickle" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = invoke("convert", str(folder), str(tmp_path / "o.safetensors"), "--allow-pickle")
    assert res.exit_code == 0, res.stderr
    assert torch.equal(af.load(tmp_path / "o.safetensors").tensor("model.layers.0.mlp.up"),
                       tensors["model.layers.0.output_adapters.adapters.task.adapter_up.weight"])


def test_per_layer_ranks_are_written_as_a_reduction_factor_mapping(tmp_path):
    adapter = af.read_foreign(FIX / "llama-houlsby")
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


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_from_zero_prefix_in_cached_generation_equals_one_call_on_the_whole_sequence(model_type):
    """Greedy generate with an adapters prefix (positions from 0) scores each step as one call on the whole
    sequence does (that call is adapters', tested above)."""
    case = f"{model_type}-prefix"
    ids = load_file(FIX / case / "expected.safetensors")["ids"]
    model = base(model_type)
    af.attach(model, af.read_foreign(FIX / case, base=FIX / "base" / model_type, allow_pickle=True))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    full = run(model, out.sequences)
    assert len(out.scores) == 3
    for i, scores in enumerate(out.scores):
        assert (scores - full[:, ids.shape[1] - 1 + i]).abs().max() <= ATOL


def test_parallel_bottleneck_kind_is_the_spec_math(tmp_path):
    """Spec 6.10.15 written out in numpy: f of submodule reads' input is added to submodule adds' output."""
    import numpy as np

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.sub = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.sub(torch.tanh(self.norm(x)))

    gen = torch.Generator().manual_seed(4)
    model = torch.nn.Sequential()
    model.add_module("block", Block())
    t = {"down": torch.randn(3, 6, generator=gen), "down_bias": torch.randn(3, generator=gen),
         "up": torch.randn(6, 3, generator=gen), "up_bias": torch.randn(6, generator=gen)}
    entry = {"kind": "parallel_bottleneck", "shape": [6],
             "params": {"activation": "relu", "scale": 1.5, "reads": "norm", "adds": "sub"}}
    af.save(af.Adapter(af.new_manifest("bottleneck", {"block": entry}), {f"block.{k}": v for k, v in t.items()}),
            tmp_path / "p.safetensors")
    x = torch.randn(4, 6, generator=gen)
    with torch.no_grad():
        y = model(x).numpy()
    n = {k: v.numpy() for k, v in t.items()}
    want = y + 1.5 * (np.maximum(x.numpy() @ n["down"].T + n["down_bias"], 0) @ n["up"].T + n["up_bias"])
    af.attach(model, af.load(tmp_path / "p.safetensors"))
    with torch.no_grad():
        assert np.abs(model(x).numpy() - want).max() <= ATOL


def test_golden_bottleneck_example_is_the_spec_math():
    """spec/examples/bottleneck in numpy (spec 6.10.15) on the golden base, its MLP run as relu(up) -> down."""
    import numpy as np

    from adapterfmt.format.golden import golden_base

    model = golden_base()
    layer = model.model.layers[0]
    layer.mlp.forward = lambda x: layer.mlp.down_proj(torch.relu(layer.mlp.up_proj(x)))
    adapter = af.load(Path(__file__).parent.parent / "spec" / "examples" / "bottleneck.safetensors")
    t = {n: adapter.tensor(n).numpy() for n in adapter.tensor_names()}
    x = torch.linspace(-1, 1, 24).reshape(3, 8)
    with torch.no_grad():
        q, mlp = layer.self_attn.q_proj(x).numpy(), layer.mlp(x).numpy()

    def f(p: str, v: np.ndarray, act) -> np.ndarray:
        return act(v @ t[f"{p}.down"].T + t[f"{p}.down_bias"]) @ t[f"{p}.up"].T + t[f"{p}.up_bias"]

    def gelu_tanh(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))

    want_q = q + 0.5 * f("model.layers.0.self_attn.q_proj", q, gelu_tanh)
    want_mlp = mlp + 2.0 * f("model.layers.0.mlp", x.numpy(), lambda v: np.maximum(v, 0))
    af.attach(model, adapter)
    with torch.no_grad():
        assert np.abs(layer.self_attn.q_proj(x).numpy() - want_q).max() <= ATOL
        assert np.abs(layer.mlp(x).numpy() - want_mlp).max() <= ATOL
        assert np.abs(want_mlp - mlp).max() > 0.1 and np.abs(want_q - q).max() > 0.1


@pytest.mark.parametrize("case", ["llama-pfeiffer", "gpt2-parallel"])
def test_layer_anchored_bottlenecks_follow_the_models_dtype(case):
    """A bottleneck on a decoder layer (which holds no parameter of its own) runs in the model's dtype."""
    expected = load_file(FIX / case / "expected.safetensors")
    model = base(case.split("-")[0]).to(torch.bfloat16)
    af.attach(model, af.read_foreign(FIX / case))
    got = run(model, expected["ids"])
    assert got.dtype == torch.bfloat16 and (got.float() - expected["logits"]).abs().max() < 0.1
