"""The sparse fine-tuning layouts in the wild: composable-sft's ``pytorch_diff.bin`` (files built as the authors'
``SFT.save`` builds them) and SpIEL's PEFT-fork folders, read exactly, written and read back, refused in one line
where 1.0 cannot hold them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import adapterfmt as af
from adapterfmt.tiny import build_tiny


def _authors_save(diffs: dict[str, torch.Tensor], abs_: dict[str, torch.Tensor], folder) -> None:  # type: ignore[no-untyped-def]
    """composable-sft's ``SFT.save``: coalesced COO coordinates flattened with multipliers
    ``cumprod([1] + size[:-1])`` (numpy int64), sorted, the first position (a numpy scalar) then int gaps."""
    enc = {}
    for name, dense in diffs.items():
        sp = dense.to_sparse().coalesce()
        mult = np.cumprod([1] + list(sp.size())[:-1], dtype=np.int64)
        pos = np.matmul(mult, sp.indices().numpy().astype(np.int64))
        perm = np.argsort(pos, kind="stable")
        pos = pos[perm]
        enc[name] = {"size": sp.size(), "index_steps": [pos[0]] + (pos[1:] - pos[:-1]).tolist(),
                     "values": sp.values()[torch.from_numpy(perm)]}
    folder.mkdir()
    torch.save({"diffs": enc, "abs": abs_}, folder / "pytorch_diff.bin")


def _dense(adapter: af.Adapter, module: str) -> torch.Tensor:
    entry = adapter.modules[module]
    return af.registry.get_kind(entry["kind"]).delta(entry, adapter.module_tensors(module))


def test_composable_sft_reads_exactly_and_round_trips(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 9, generator=g) * (torch.rand(6, 9, generator=g) < 0.2)
    ln = torch.randn(9, generator=g) * (torch.rand(9, generator=g) < 0.5)
    head, head_b = torch.randn(3, 9, generator=g), torch.randn(3, generator=g)
    _authors_save({"enc.layer.0.q.weight": w, "enc.ln.bias": ln}, {"cls.weight": head, "cls.bias": head_b},
                  tmp_path / "sft")
    assert af.registry.formats()["composable_sft"].detect(tmp_path / "sft")
    with pytest.raises(af.UnsupportedError, match="allow-pickle"):
        af.read_foreign(tmp_path / "sft")
    a = af.validate(af.read_foreign(tmp_path / "sft", allow_pickle=True))
    torch.testing.assert_close(_dense(a, "enc.layer.0.q"), w)
    assert a.modules["enc.ln"]["parameter"] == "bias"
    torch.testing.assert_close(_dense(a, "enc.ln"), ln)
    assert a.modules["cls"] == {"kind": "dense", "shape": [3, 9], "params": {"mode": "replace"}}
    assert torch.equal(a.tensor("cls.value"), head) and torch.equal(a.tensor("cls.bias_value"), head_b)
    af.write_foreign(a, tmp_path / "back", "composable_sft")
    raw = torch.load(tmp_path / "back" / "pytorch_diff.bin", weights_only=True)
    orig = torch.load(tmp_path / "sft" / "pytorch_diff.bin", weights_only=False)
    for name in orig["diffs"]:  # the authors' own encoding, position for position
        assert [int(s) for s in raw["diffs"][name]["index_steps"]] == [int(s) for s in orig["diffs"][name]["index_steps"]]
        assert torch.equal(raw["diffs"][name]["values"], orig["diffs"][name]["values"])
    b = af.read_foreign(tmp_path / "back", allow_pickle=True)
    assert all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.tensor_names())


@pytest.mark.parametrize(("diffs", "abs_", "msg"), [
    ({"m.weight": torch.eye(3), "m.bias": torch.ones(3)}, {}, r"diffs\['m.bias'\]: module 'm' has a diff on another"),
    ({"m.weight": torch.eye(3)}, {"m.bias": torch.ones(3)}, r"abs\['m.bias'\]: module 'm' has a sparse diff too"),
    ({"m.weight": torch.ones(2, 2, 2)}, {}, r"diffs\['m.weight'\].size \[2, 2, 2\]: .*more than 2 dimensions"),
])
def test_composable_sft_refuses_what_one_entry_per_module_cannot_hold(tmp_path, diffs, abs_, msg) -> None:
    _authors_save(diffs, abs_, tmp_path / "sft")
    with pytest.raises(af.FormatError, match=msg):
        af.read_foreign(tmp_path / "sft", allow_pickle=True)


def test_spiel_folder_reads_unsorted_int32_indices_and_round_trips(tmp_path) -> None:
    model = build_tiny(seed=0)
    g = torch.Generator().manual_seed(1)
    folder = tmp_path / "spiel"
    folder.mkdir()
    state, want = {}, {}
    for m in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        n = model.get_submodule(m).weight.numel()
        idx = torch.randperm(n, generator=g)[:40].to(torch.int32)  # after reselection: unsorted
        vals = torch.randn(40, generator=g)
        state[f"base_model.model.{m}.sft_delta.indices"], state[f"base_model.model.{m}.sft_delta.values"] = idx, vals
        dense = torch.zeros(n)
        dense[idx.long()] = vals
        want[m] = dense.reshape(model.get_submodule(m).weight.shape)
    af.write_tensor_file(folder / "adapter_model.safetensors", state)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "SFT", "density": 0.01,
                                                            "target_modules": ["q_proj", "down_proj"]}))
    assert af.registry.formats()["spiel"].detect(folder)
    with pytest.raises(af.UnsupportedError, match="--base"):
        af.read_foreign(folder)
    a = af.validate(af.read_foreign(folder, base=model))
    assert a.method == "spiel"
    for m, dense in want.items():
        torch.testing.assert_close(_dense(a, m), dense)
    af.write_foreign(a, tmp_path / "back", "spiel")
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SFT" and config["num_deltas"] == dict.fromkeys(want, 40)
    back, _ = af.read_tensor_file(tmp_path / "back" / "adapter_model.safetensors")
    assert all(t.dtype == torch.int32 for k, t in back.items() if k.endswith("indices"))
    b = af.read_foreign(tmp_path / "back", base=model)
    assert all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.tensor_names())
    lora = af.registry.get_method("lora").train(model, config={"target_modules": ["q_proj"]})
    with pytest.raises(af.UnsupportedError, match="SpIEL holds sparse deltas of weights; this entry is 'lowrank'"):
        af.write_foreign(lora.extract(), tmp_path / "no", "spiel")
    assert not (tmp_path / "no").exists()
