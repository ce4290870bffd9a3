"""The base fingerprint (adapterfmt-fp1): the same for a checkpoint in one file or sharded any way, equal to
the fingerprint of the model in memory, different when weights, names or shapes change; cheap to compute."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import adapterfmt as af
from adapterfmt.format.fingerprint import SAMPLES, compare, sample_positions
from adapterfmt.tiny import build_tiny


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def save_sharded(sd: dict[str, torch.Tensor], folder: Path, groups: list[list[str]], *, index: bool) -> Path:
    """Write ``sd`` as one shard per group of names (with a HF-style index when asked)."""
    folder.mkdir(parents=True)
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: sd[n] for n in names}, folder / fname)
        weight_map.update({n: fname for n in names})
    if index:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_spec_definition_written_out_by_hand():
    """The digest, recomputed from the spec's words with hashlib (no adapterfmt code), matches."""
    sd = {"b.weight": torch.arange(40, dtype=torch.float32).reshape(5, 8),
          "a.bias": torch.tensor([1.5, -2.0], dtype=torch.float16), "c.empty": torch.empty(0, 3)}
    model = torch.nn.Module()
    for name, t in sd.items():
        parent, leaf = name.split(".")
        model.add_module(parent, torch.nn.Module())
        getattr(model, parent).register_buffer(leaf, t)
    dtype = {torch.float32: "F32", torch.float16: "F16"}
    names = sorted(sd)
    structure = hashlib.sha256("".join(f"{n}\t{dtype[sd[n].dtype]}\t{','.join(map(str, sd[n].shape))}\n"
                                       for n in names).encode()).hexdigest()
    values = hashlib.sha256()
    for n in names:
        flat, k = sd[n].reshape(-1), sd[n].numel()
        for p in ([(i * k) // 16 for i in range(16)] + [k - 1] if k else []):
            values.update(flat[p:p + 1].numpy().tobytes())
    fp = af.fingerprint_module(model)
    assert fp == {"algorithm": "adapterfmt-fp1", "structure": structure, "values": values.hexdigest(), "tensors": 3}


def test_sample_positions_follow_the_spec():
    assert sample_positions(0) == []
    assert sample_positions(1) == [0] * 17
    assert sample_positions(1000) == [i * 1000 // 16 for i in range(16)] + [999]
    assert len(sample_positions(10 ** 12)) == SAMPLES + 1


def test_one_file_any_sharding_and_memory_agree(tmp_path):
    model = build_tiny(seed=3)
    sd = state(model)
    names = sorted(sd)
    save_file(sd, tmp_path / "one.safetensors")
    a = save_sharded(sd, tmp_path / "three", [names[0::3], names[1::3], names[2::3]], index=True)
    b = save_sharded(sd, tmp_path / "two", [names[:5], names[5:]], index=False)
    fps = [af.fingerprint_checkpoint(p) for p in (tmp_path / "one.safetensors", a, b)]
    mem = af.fingerprint_module(model)
    assert all(fp == mem for fp in fps)
    assert mem["tensors"] == len(sd) and mem["values"] is not None
    assert af.fingerprint_checkpoint(a, values=False) == {**mem, "values": None}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transformers_save_pretrained_sharded_with_tied_weights_matches_memory(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32)
        model = transformers.GPT2LMHeadModel(cfg)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    model.save_pretrained(tmp_path / "single")
    shards = list((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    on_disk = [af.fingerprint_checkpoint(tmp_path / d) for d in ("sharded", "single")]
    assert on_disk[0] == on_disk[1] == af.fingerprint_module(model)


def _changed(tmp_path: Path, name: str, edit) -> dict:
    sd = state(build_tiny(seed=3))
    edit(sd)
    save_file(sd, tmp_path / f"{name}.safetensors")
    return af.fingerprint_checkpoint(tmp_path / f"{name}.safetensors")


def test_fingerprint_changes_with_the_weights(tmp_path):
    base = af.fingerprint_module(build_tiny(seed=3))
    q = "model.layers.1.self_attn.q_proj.weight"

    def finetune_one_layer(sd):  # what merging a LoRA into one layer does: every element moves a little
        g = torch.Generator().manual_seed(1)
        sd[q] = sd[q] + 1e-3 * torch.randn(4, 64, generator=g).t() @ torch.randn(4, 64, generator=g)

    def rename(sd):
        sd["model.layers.1.self_attn.query.weight"] = sd.pop(q)

    def reshape(sd):
        sd[q] = sd[q].reshape(32, 128).contiguous()

    def recast(sd):
        sd[q] = sd[q].to(torch.bfloat16)

    tuned = _changed(tmp_path, "tuned", finetune_one_layer)
    assert tuned["structure"] == base["structure"] and tuned["values"] != base["values"]
    assert compare(base, tuned) == "new-weights"
    for name, edit in [("renamed", rename), ("reshaped", reshape), ("recast", recast)]:
        fp = _changed(tmp_path, name, edit)
        assert fp["structure"] != base["structure"], name
        assert compare(base, fp) == "different"
    assert compare(base, _changed(tmp_path, "same", lambda sd: None)) == "same"
    assert compare(None, base) == "unknown"


def test_a_checkpoint_is_fingerprinted_from_a_small_fraction_of_its_bytes(tmp_path):
    """Bytes the process reads (rchar of /proc/self/io, which counts every read/pread) stay tiny."""
    sd = {f"layer.{i}.weight": torch.randn(512, 512) for i in range(20)}  # 20 MiB
    path = tmp_path / "m.safetensors"
    save_file(sd, path)

    def rchar() -> int:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
        raise AssertionError("no rchar")

    start = rchar()
    fp = af.fingerprint_checkpoint(path)
    read = rchar() - start
    size = path.stat().st_size
    assert fp == af.fingerprint_module(_as_module(sd))
    assert read < 64 * 1024, f"read {read} bytes of {size}"
    assert read / size < 0.005


def _as_module(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    m = torch.nn.Module()
    for name, t in sd.items():
        _, i, leaf = name.split(".")
        if not hasattr(m, "layer"):
            m.layer = torch.nn.ModuleList()
        while len(m.layer) <= int(i):
            m.layer.append(torch.nn.Module())
        m.layer[int(i)].register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
    return m


def test_tied_weights_count_once_under_the_first_name():
    model = build_tiny(seed=1)
    model.lm_head.weight = model.model.embed_tokens.weight
    fp = af.fingerprint_module(model)
    sd = state(model)
    del sd["lm_head.weight"]
    assert fp["tensors"] == len(sd)
    untied = build_tiny(seed=1)
    del untied.lm_head
    untied.lm_head = torch.nn.Identity()
    with torch.no_grad():
        untied.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
    assert af.fingerprint_module(untied) == fp


def test_missing_checkpoint_or_bad_index_is_a_clear_error(tmp_path):
    with pytest.raises(af.MissingFileError, match="no such checkpoint"):
        af.fingerprint_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(af.MissingFileError, match="no .safetensors files"):
        af.fingerprint_checkpoint(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(af.FormatError, match="no valid weight_map"):
        af.fingerprint_checkpoint(tmp_path / "bad")
