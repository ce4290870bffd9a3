"""Baking adapters into safetensors checkpoints, streamed: the baked checkpoint loads in transformers and
gives PEFT's merge_and_unload logits; sharding, extra files, refusals and atomicity; the stream writer."""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from adapterfmt.cli.main import app
from helpers_peft import VOCAB, build, logits, randomize
from peft import LoraConfig, get_peft_model
from typer.testing import CliRunner

import adapterfmt as af
from adapterfmt.format.safetensors_io import StreamWriter, dtype_name, read_header, read_tensor, write_file
from adapterfmt.verbs.bake import INDEX_FILE, bake
from adapterfmt.verbs.merge import merge_adapters

IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
EXTRAS = {"tokenizer.json": '{"version": "1.0"}', "generation_config.json": '{"do_sample": false}'}
MODEL_CLASS = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}


def save_base(model: torch.nn.Module, folder: Path, **kw: object) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, **kw)
    for name, text in EXTRAS.items():
        (folder / name).write_text(text)
    return folder


def peft_adapter(tmp: Path, model_name: str, base_dir: Path, *, seed: int = 1, dtype: torch.dtype = torch.float32,
                 **lora: object) -> tuple[af.Adapter, torch.nn.Module]:
    """A PEFT LoRA (random, non-zero B) on ``model_name``, saved by PEFT and read by adapterfmt's converter;
    returns it and the live PEFT model."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(build(model_name).to(dtype), cfg)
        randomize(pm, seed)
        pm.eval()
        pm.save_pretrained(tmp / f"peft-{seed}")
    return af.read_foreign(tmp / f"peft-{seed}", "peft", base=base_dir), pm


def load_baked(model_name: str, folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, MODEL_CLASS[model_name]).from_pretrained(folder, dtype=dtype).eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama saved in shards with an index, and its PEFT-trained-looking LoRA; paths."""
    tmp = tmp_path_factory.mktemp("llama")
    base = save_base(build("llama"), tmp / "base", max_shard_size="20KB")
    return tmp, base


def test_baked_llama_gives_peft_merge_and_unload_logits(llama):
    tmp, base = llama
    assert (base / INDEX_FILE).is_file() and len(list(base.glob("*.safetensors"))) >= 2
    adapter, pm = peft_adapter(tmp, "llama", base)
    out = tmp / "baked"
    report = bake([adapter], base, out)
    expected = logits(pm.merge_and_unload(), IDS)
    got = logits(load_baked("llama", out), IDS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert report.fingerprints == ["same"] and not report.not_found
    assert len(report.changed) == 2 * 7  # two layers, all seven linear projections (lm_head excluded by PEFT)
    assert set(report.copied) == {"config.json", *EXTRAS}
    for name, text in EXTRAS.items():
        assert (out / name).read_text() == text
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in base.glob("*.safetensors")}
    assert index["metadata"]["total_size"] == sum(read_header(p).file_size - read_header(p).data_start
                                                  for p in base.glob("*.safetensors"))
    # untouched tensors are byte-identical copies
    ref = {n: read_tensor(h, n) for p in base.glob("*.safetensors") for h in [read_header(p)] for n in h.tensors}
    for p in out.glob("*.safetensors"):
        h = read_header(p)
        assert h.metadata.get("format") == "pt"
        for n in h.tensors:
            if n not in report.changed:
                assert torch.equal(read_tensor(h, n), ref[n]), n


def test_baked_gpt2_conv1d_single_file_base(tmp_path):
    base = save_base(build("gpt2"), tmp_path / "base")
    adapter, pm = peft_adapter(tmp_path, "gpt2", base, fan_in_fan_out=True)
    assert any(e["params"].get("transposed") for e in adapter.modules.values())
    report = bake([adapter], base / "model.safetensors", tmp_path / "baked.safetensors")
    assert report.files == ["baked.safetensors"] and report.fingerprints == ["same"]
    (tmp_path / "load").mkdir()
    os.link(tmp_path / "baked.safetensors", tmp_path / "load" / "model.safetensors")
    (tmp_path / "load" / "config.json").write_text((base / "config.json").read_text())
    expected = logits(pm.merge_and_unload(), IDS)
    torch.testing.assert_close(logits(load_baked("gpt2", tmp_path / "load"), IDS), expected, atol=1e-5, rtol=0)


def test_baked_bf16_checkpoint_within_bf16_tolerance(tmp_path):
    model = build("llama").to(torch.bfloat16)
    base = save_base(model, tmp_path / "base")
    adapter, pm = peft_adapter(tmp_path, "llama", base, dtype=torch.bfloat16)
    bake([adapter], base, tmp_path / "baked")
    baked = load_baked("llama", tmp_path / "baked", torch.bfloat16)
    merged = pm.merge_and_unload()
    for name, p in baked.state_dict().items():
        q = merged.state_dict()[name]
        assert p.dtype == torch.bfloat16
        # each weight within one bf16 rounding of PEFT's (PEFT adds in bf16; the bake adds in fp32, rounds once)
        torch.testing.assert_close(p.float(), q.float(), atol=0, rtol=2 ** -7, msg=name)
    got, want = logits(baked, IDS).float(), logits(merged, IDS).float()
    torch.testing.assert_close(got, want, atol=0.05 * float(want.abs().max()), rtol=0)


def test_two_adapters_weighted_match_peft_cat_combination(llama):
    tmp, base = llama
    a, pm = peft_adapter(tmp, "llama", base, seed=1)
    b, pm_b = peft_adapter(tmp, "llama", base, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.load_adapter(tmp / "peft-2", adapter_name="other")
        pm.add_weighted_adapter(["default", "other"], [0.6, -0.4], "mix", combination_type="cat")
        pm.set_adapter("mix")
    expected = logits(pm.merge_and_unload(adapter_names=["mix"]), IDS)
    bake([a, b], base, tmp / "baked-two", weights=[0.6, -0.4])
    torch.testing.assert_close(logits(load_baked("llama", tmp / "baked-two"), IDS), expected, atol=1e-5, rtol=0)


def test_dora_is_materialised_against_the_base(tmp_path):
    base = save_base(build("llama"), tmp_path / "base")
    adapter, pm = peft_adapter(tmp_path, "llama", base, use_dora=True)
    assert any(e["kind"] == "lowrank" and "magnitude" in adapter.roles(m) for m, e in adapter.modules.items())
    bake([adapter], base, tmp_path / "baked")
    expected = logits(pm.merge_and_unload(), IDS)
    torch.testing.assert_close(logits(load_baked("llama", tmp_path / "baked"), IDS), expected, atol=1e-5, rtol=0)
    with pytest.raises(af.UnsupportedError, match="weight 1 and the linear strategy"):
        bake([adapter], base, tmp_path / "no", weights=[0.5])
    assert not (tmp_path / "no").exists()


def test_any_strategy_bakes_its_merged_delta(llama):
    tmp, base = llama
    a, _ = peft_adapter(tmp, "llama", base, seed=1)
    b, _ = peft_adapter(tmp, "llama", base, seed=2)
    opts = {"weights": [1.0, 0.5], "strategy": "ties", "density": 0.3}
    report = bake([a, b], base, tmp / "baked-ties", **opts)
    merged = merge_adapters([a, b], **opts)
    ref = {n: read_tensor(h, n) for p in base.glob("*.safetensors") for h in [read_header(p)] for n in h.tensors}
    got = {n: read_tensor(h, n) for p in (tmp / "baked-ties").glob("*.safetensors") for h in [read_header(p)]
           for n in h.tensors}
    for module, entry in merged.modules.items():
        name = f"{module}.weight"
        d = af.registry.get_kind(entry["kind"]).delta(entry, merged.module_tensors(module))
        torch.testing.assert_close(got[name], ref[name] + d, atol=1e-6, rtol=1e-6)
    assert len(report.changed) == len(merged.modules)


def test_reshard_and_cli(llama):
    tmp, base = llama
    a, pm = peft_adapter(tmp, "llama", base, seed=1)
    path = af.save(a, tmp / "lora-a", overwrite=True)
    res = CliRunner().invoke(app, ["merge", str(path), "--into", str(base), "--out", str(tmp / "resharded"),
                                   "--shard-size", "8KB", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    out = tmp / "resharded"
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == report["files"] and len(files) > 1 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    for p in out.glob("*.safetensors"):
        h = read_header(p)
        assert h.file_size - h.data_start <= 8_000 or len(h.tensors) == 1
    assert set(json.loads((out / INDEX_FILE).read_text())["weight_map"].values()) == set(files)
    torch.testing.assert_close(logits(load_baked("llama", out), IDS), logits(pm.merge_and_unload(), IDS),
                               atol=1e-5, rtol=0)


# ----- refusals -------------------------------------------------------------------------------------------
def test_fingerprint_mismatch_missing_modules_and_misfits_are_refused(llama, tmp_path):
    tmp, base = llama
    adapter, _ = peft_adapter(tmp, "llama", base)
    other = save_base(build("llama", seed=5), tmp_path / "other")  # same architecture, other weights
    with pytest.raises(af.BaseMismatchError, match=r"fingerprint does not match.*new-weights.*force"):
        bake([adapter], other, tmp_path / "out")
    assert bake([adapter], other, tmp_path / "out", force=True).fingerprints == ["new-weights"]

    extra = copy.deepcopy(adapter.manifest)
    extra["modules"]["model.layers.9.mlp.up_proj"] = extra["modules"]["model.layers.0.mlp.up_proj"]
    tensors = {**adapter.tensors(), **{n.replace("layers.0.", "layers.9."): v for n, v in adapter.tensors().items()
                                       if n.startswith("model.layers.0.mlp.up_proj.")}}
    extra["base"]["fingerprint"] = None
    lost = af.Adapter(extra, tensors)
    with pytest.raises(af.BaseMismatchError, match=r"no tensor model\.layers\.9\.mlp\.up_proj\.weight.*force"):
        bake([lost], base, tmp_path / "out2")
    report = bake([lost], base, tmp_path / "out2", force=True)
    assert report.not_found == ["model.layers.9.mlp.up_proj.weight"]

    misfit = copy.deepcopy(adapter.manifest)
    misfit["modules"]["model.layers.0.mlp.up_proj"]["shape"] = [33, 16]
    with pytest.raises(af.BaseMismatchError, match=r"up_proj\.weight: adapter expects \[33, 16\]"):
        bake([af.Adapter(misfit, adapter.tensors())], base, tmp_path / "out3", force=True)
    assert not (tmp_path / "out3").exists()
    with pytest.raises(af.OutputExistsError):
        bake([adapter], base, tmp_path / "out", force=True)


def test_a_failed_bake_leaves_nothing(llama, tmp_path, monkeypatch):
    tmp, base = llama
    adapter, _ = peft_adapter(tmp, "llama", base)
    import adapterfmt.verbs.bake as bk

    calls = {"n": 0}
    real = bk._changed

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(*args, **kw)

    monkeypatch.setattr(bk, "_changed", failing)
    with pytest.raises(OSError, match="disk full"):
        bake([adapter], base, tmp_path / "out")
    assert os.listdir(tmp_path) == []


# ----- the stream writer --------------------------------------------------------------------------------
def test_stream_writer_matches_write_file_and_checks_its_input(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(3, 5, generator=gen).to(torch.bfloat16), "a": torch.arange(7),
               "c": torch.zeros(0, 4), "d": torch.tensor(True)}
    sha = write_file(tmp_path / "ref.safetensors", tensors, {"format": "pt"})
    specs = {n: (dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()}
    src = tmp_path / "ref.safetensors"
    h = read_header(src)
    buf = io.BytesIO()
    fd = os.open(src, os.O_RDONLY)
    try:
        with open(tmp_path / "stream.safetensors", "wb") as f:
            w = StreamWriter(f, specs, {"format": "pt"})
            assert w.order == ["a", "b", "c", "d"]
            w.write("a", tensors["a"])
            w.copy("b", fd, h.tensors["b"].start)  # raw kernel copy
            w.write("c", tensors["c"])
            w.write("d", tensors["d"])
            assert w.finish() == ""
    finally:
        os.close(fd)
    assert (tmp_path / "stream.safetensors").read_bytes() == src.read_bytes()
    hashed = StreamWriter(buf, specs, {"format": "pt"}, sha256=True)
    for n in hashed.order:
        hashed.write(n, tensors[n])
    assert hashed.finish() == sha and buf.getvalue() == src.read_bytes()
    w = StreamWriter(io.BytesIO(), specs)
    with pytest.raises(af.FormatError, match="got tensor 'b', expected a"):
        w.write("b", tensors["b"])
    w = StreamWriter(io.BytesIO(), specs)
    with pytest.raises(af.FormatError, match=r"declared I64 \[7\]"):
        w.write("a", torch.arange(7, dtype=torch.int32))
    w = StreamWriter(io.BytesIO(), specs)
    w.write("a", tensors["a"])
    with pytest.raises(af.FormatError, match="3 tensor\\(s\\) unwritten, first 'b'"):
        w.finish()
