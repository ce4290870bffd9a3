"""PEFT's multiplicative types (OFT, BOFT, HRA) through ``adapter convert``, with the real peft package as the
oracle: converted adapters attached by adapterfmt give PEFT's logits (fp32, atol 1e-5), unmerged and merged;
``--to peft`` gives files PEFT loads with no missing or unexpected keys, the same tensors and the same logits;
what cannot be represented is refused in one line with nothing written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from helpers_peft import build, case, load_peft, logits, randomize
from helpers_spec import invoke
from peft import BOFTConfig, HRAConfig, OFTConfig, get_peft_model
from safetensors.torch import load_file

import adapterfmt as af

ATOL = 1e-5

CASES = {
    "llama-oft-neumann-embedding": ("llama", lambda: OFTConfig(
        r=0, oft_block_size=4, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])),
    "llama-oft-exact-shared-block": ("llama", lambda: OFTConfig(
        r=0, oft_block_size=4, block_share=True, use_cayley_neumann=False, target_modules=["q_proj", "o_proj"])),
    "llama-oft-coft-3-terms": ("llama", lambda: OFTConfig(
        r=2, oft_block_size=0, coft=True, eps=0.5, num_cayley_neumann_terms=3, target_modules=["k_proj", "gate_proj"])),
    "llama-boft": ("llama", lambda: BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj", "up_proj"])),
    "llama-hra": ("llama", lambda: HRAConfig(r=3, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-hra-gram-schmidt": ("llama", lambda: HRAConfig(r=2, apply_GS=True, target_modules=["q_proj", "gate_proj"])),
    "gpt2-oft-wte": ("gpt2", lambda: OFTConfig(r=0, oft_block_size=8, target_modules=["wte"])),
    "gpt2-boft-head": ("gpt2", lambda: BOFTConfig(boft_block_size=8, target_modules=["lm_head"])),
    "gpt2-hra-head": ("gpt2", lambda: HRAConfig(r=2, target_modules=["lm_head"])),
}
"""GPT-2's blocks are Conv1D, which PEFT's OFT, BOFT and HRA refuse: its embedding and (tied) head are used."""
TIED = {"gpt2-oft-wte", "gpt2-boft-head", "gpt2-hra-head"}
"""Cases whose target shares its weight with another module (GPT-2's head and wte): merging changes both, in
PEFT too, so only the unmerged function is compared."""


def _save_base(model: torch.nn.Module, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    return folder


def _convert(tmp_path: Path, c, name: str) -> af.Adapter:
    out = tmp_path / "converted.safetensors"
    if name.endswith("-head"):  # the checkpoint drops the tied lm_head.weight: the live model gives it
        af.convert(c.folder, out, base=c.base)
        return af.load(out)
    res = invoke("convert", str(c.folder), str(out), "--base", str(_save_base(c.base, tmp_path / "base")))
    assert res.exit_code == 0, res.stdout + res.stderr
    return af.load(out)


@pytest.mark.parametrize("name", list(CASES))
def test_peft_multiplicative_round_trip(tmp_path, name):
    model_name, config = CASES[name]
    c = case(tmp_path, model_name, config())
    adapter = _convert(tmp_path, c, name)
    kinds = {e["kind"] for e in adapter.modules.values()}
    assert kinds == {{"OFT": "cayley", "BOFT": "butterfly", "HRA": "householder"}[config().peft_type.value]}

    model = build(model_name)
    before = copy.deepcopy(model.state_dict())
    af.attach(model, adapter, name="a")
    assert (logits(model, c.ids) - c.expected).abs().max() <= ATOL
    if name not in TIED:
        af.merge_into(model, "a")
        assert (logits(model, c.ids) - c.expected).abs().max() <= ATOL
    af.detach(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    back = tmp_path / "back"
    if name.endswith("-head"):
        af.write_foreign(adapter, back, "peft")
    else:
        res = invoke("convert", str(tmp_path / "converted.safetensors"), str(back), "--to", "peft")
        assert res.exit_code == 0, res.stdout + res.stderr
    pm, missing, unexpected = load_peft(model_name, back)
    assert missing == [] and unexpected == []
    written = json.loads((back / "adapter_config.json").read_text())
    assert set(written) <= {f.name for f in dataclasses.fields(type(config()))}, "keys PEFT's config does not take"
    assert (logits(pm, c.ids) - c.expected).abs().max() <= ATOL
    src, ours = load_file(c.folder / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    assert set(src) - set(ours) <= {k for k in src if k.endswith(".base_layer.weight")}  # PEFT's saved embeddings
    for key, t in ours.items():  # coft: the projection PEFT applies at every forward is applied once more
        assert torch.equal(t, src[key]) if "coft" not in name else torch.allclose(t, src[key], atol=1e-7), key


class _BlockDiag:
    """Stands in for PEFT's CUDA-only FastBlockDiag extension: block-diagonal matrices of [N, D, H, H] blocks."""

    @staticmethod
    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*x[i]) for i in range(x.shape[0])])]


def test_boft_with_several_butterfly_factors(tmp_path, monkeypatch):
    """PEFT keeps boft_n_butterfly_factor > 1 only with its CUDA block-diagonal kernel; with that kernel's
    torch equivalent in its place, PEFT's own permutations and products run on the CPU."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: _BlockDiag)
    c = case(tmp_path, "llama", BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3,
                                           target_modules=["q_proj", "down_proj"]))
    raw = load_file(c.folder / "adapter_model.safetensors")
    assert raw["base_model.model.model.layers.0.mlp.down_proj.boft_R"].shape == (3, 16, 2, 2)
    af.convert(c.folder, tmp_path / "b.safetensors", base=c.base)
    model = build("llama")
    af.attach(model, af.load(tmp_path / "b.safetensors"), merge=True)
    assert (logits(model, c.ids) - c.expected).abs().max() <= ATOL


def test_trained_oft_gives_peft_the_same_function(tmp_path):
    """An OFT adapter trained here (PEFT's default Cayley-Neumann form) is an OFT adapter PEFT runs identically."""
    model, ids = build("llama"), torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(0))
    session = af.registry.get_method("oft").train(model, config={"target_modules": ["q_proj", "v_proj"],
                                                                 "neumann_terms": 5})
    with torch.no_grad():
        for p in session.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    want = logits(model, ids)
    adapter = session.extract()
    session.remove()
    af.write_foreign(adapter, tmp_path / "peft", "peft")
    pm, missing, unexpected = load_peft("llama", tmp_path / "peft")
    assert missing == [] and unexpected == []
    assert (logits(pm, ids) - want).abs().max() <= ATOL


# ----- refusals ---------------------------------------------------------------------------------------------
def test_unrepresentable_config_is_one_line_and_nothing_written(tmp_path):
    c = case(tmp_path, "llama", OFTConfig(r=0, oft_block_size=4, bias="all", target_modules=["q_proj"]))
    res = invoke("convert", str(c.folder), str(tmp_path / "o.safetensors"), "--base",
                 str(_save_base(c.base, tmp_path / "base")))
    assert res.exit_code == 1 and "OFT with bias='all'" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_writing_what_peft_cannot_hold_is_refused(tmp_path):
    gpt2 = build("gpt2")
    session = af.registry.get_method("oft").train(gpt2, config={"target_modules": ["c_attn"]})
    adapter = session.extract()
    session.remove()
    with pytest.raises(af.UnsupportedError, match="PEFT OFT multiplies the inputs of nn.Linear / nn.Conv2d modules"):
        af.write_foreign(adapter, tmp_path / "p", "peft")
    mixed = af.Adapter(af.new_manifest("hra", {
        "a": {"kind": "householder", "shape": [4, 6], "params": {}},
        "b": {"kind": "householder", "shape": [4, 6], "params": {}}}),
        {"a.vectors": torch.randn(6, 2), "b.vectors": torch.randn(6, 3)})
    with pytest.raises(af.UnsupportedError, match="one r for every module"):
        af.write_foreign(mixed, tmp_path / "q", "peft")
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()


# ----- stacking (spec 6.10.7) -------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj", "down_proj"]),
    lambda: BOFTConfig(boft_block_size=4, target_modules=["q_proj", "down_proj"]),
    lambda: HRAConfig(r=2, target_modules=["q_proj", "down_proj"]),
], ids=["oft", "boft", "hra"])
def test_stacked_rotations_compose_as_merged_in_order(tmp_path, make):
    """Two rotations on one module: merged one after another they give PEFT's merged chain (x G2 G1, which is
    also BOFT's and HRA's unmerged chain, while PEFT's unmerged OFT applies x G1 G2); unmerged, the second
    input-side one is refused in one line; an additive adapter may follow the rotation unmerged."""
    from peft import PeftModel

    first = case(tmp_path / "1", "llama", make())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(build("llama"), make())
        randomize(pm, 7)
        pm.save_pretrained(tmp_path / "2b")
        pm = PeftModel.from_pretrained(build("llama"), first.folder, adapter_name="a")
        pm.load_adapter(tmp_path / "2b", adapter_name="b")
        pm.base_model.set_adapter(["a", "b"])
        unmerged = logits(pm.eval(), first.ids)
        merged = logits(pm.merge_and_unload(adapter_names=["a", "b"]).eval(), first.ids)
    ours = [af.read_foreign(first.folder, base=first.base), af.read_foreign(tmp_path / "2b", base=first.base)]
    model = build("llama")
    af.attach(model, ours[0], name="a")
    af.attach(model, ours[1], name="b")
    with pytest.raises(af.UnsupportedError, match=r"adapter 'b' \(kind \w+\) must be the first unmerged adapter"):
        logits(model, first.ids)
    af.merge_into(model, "a")
    af.merge_into(model, "b")
    torch.testing.assert_close(logits(model, first.ids), merged, atol=ATOL, rtol=0)
    if isinstance(make(), OFTConfig):
        assert (unmerged - merged).abs().max() > 1e-3  # PEFT's two OFT chains differ
    else:
        torch.testing.assert_close(unmerged, merged, atol=ATOL, rtol=0)
    af.unmerge(model, "b")
    af.detach(model)

    # a rotation first, an additive adapter after it: unmerged equals merged in that order
    lora = af.registry.get_method("lora").train(build("llama"), config={"target_modules": ["q_proj"], "r": 2})
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    extra = lora.extract()
    lora.remove()
    model = build("llama")
    af.attach(model, ours[0], name="a")
    af.attach(model, extra, name="l")
    got = logits(model, first.ids)
    af.merge_into(model, "a")
    af.merge_into(model, "l")
    torch.testing.assert_close(logits(model, first.ids), got, atol=ATOL, rtol=0)
    assert (got - logits(build("llama"), first.ids)).abs().max() > 1e-3


# ----- Conv2d ---------------------------------------------------------------------------------------------
class ConvNet(torch.nn.Module):
    """A 1x1 convolution, then a strided 3x3 one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pw = torch.nn.Conv2d(4, 8, 1)
        self.conv = torch.nn.Conv2d(8, 6, 3, padding=1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nn.functional.gelu(self.pw(x)))


CONV_CASES = {
    "oft": lambda t: OFTConfig(r=0, oft_block_size=4, target_modules=t),
    "oft-exact-shared": lambda t: OFTConfig(r=0, oft_block_size=4, use_cayley_neumann=False, block_share=True,
                                           target_modules=t),
    "boft": lambda t: BOFTConfig(boft_block_size=4, target_modules=t),
    "hra": lambda t: HRAConfig(r=2, target_modules=t),
    "hra-gram-schmidt": lambda t: HRAConfig(r=3, apply_GS=True, target_modules=t),
}


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_rotations_on_conv2d(tmp_path, name):
    """On a Conv2d the rotation acts on the flattened in * kh * kw weight axis: attached unmerged and merged,
    the converted adapter gives PEFT's merged output; PEFT's unmerged forward agrees for BOFT and HRA, and for OFT
    only on the 1x1 kernel (a note says so); --to peft gives the same tensors and output back."""
    from safetensors.torch import save_model

    make, x = CONV_CASES[name], torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(ConvNet(), make(["pw", "conv"]))
        randomize(pm, 1)
        pm.eval().save_pretrained(tmp_path / "peft")
        with torch.no_grad():
            unmerged = pm(x)
            pm.merge_adapter()
            merged = pm(x)
    base = tmp_path / "base.safetensors"
    save_model(ConvNet(), str(base))
    res = invoke("convert", str(tmp_path / "peft"), str(tmp_path / "a.safetensors"), "--base", str(base))
    assert res.exit_code == 0, res.stdout + res.stderr
    adapter = af.load(tmp_path / "a.safetensors")
    assert adapter.modules["conv"]["shape"] == [6, 8, 3, 3]
    notes = adapter.manifest["provenance"][0].get("notes", [])
    assert [n.split(":")[0] for n in notes if "unmerged forward" in n] == (["conv"] if name.startswith("oft") else [])

    model = ConvNet().eval()
    with torch.no_grad():
        plain = model(x)
        af.attach(model, adapter, name="a")
        got = model(x)
        torch.testing.assert_close(got, merged, atol=ATOL, rtol=0)
        assert (got - plain).abs().max() > 1e-3
        af.merge_into(model, "a")
        torch.testing.assert_close(model(x), merged, atol=ATOL, rtol=0)
        af.detach(model)
        torch.testing.assert_close(model(x), plain, atol=0, rtol=0)
    if name.startswith("oft"):
        assert (unmerged - merged).abs().max() > 1e-3  # PEFT's unmerged OFT on the 3x3 kernel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pw_only = get_peft_model(ConvNet(), make(["pw"]))
            randomize(pw_only, 1)
            with torch.no_grad():
                want = pw_only.eval()(x)
            pw_only.save_pretrained(tmp_path / "pw")
        model = ConvNet().eval()
        af.attach(model, af.read_foreign(tmp_path / "pw", base=ConvNet()))
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(unmerged, merged, atol=ATOL, rtol=0)

    res = invoke("convert", str(tmp_path / "a.safetensors"), str(tmp_path / "back"), "--to", "peft")
    assert res.exit_code == 0, res.stdout + res.stderr
    src, ours = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "back" /
                                                                                      "adapter_model.safetensors")
    assert sorted(src) == sorted(ours) and all(torch.equal(ours[k], src[k]) for k in src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from peft import PeftModel

        back = PeftModel.from_pretrained(ConvNet(), tmp_path / "back").eval()
        back.merge_adapter()
        with torch.no_grad():
            torch.testing.assert_close(back(x), merged, atol=ATOL, rtol=0)


def test_non_square_convolution_kernel_cannot_go_to_peft(tmp_path):
    entry = {"kind": "householder", "shape": [6, 8, 3, 1], "params": {"side": "input"}}
    adapter = af.validate(af.Adapter(af.new_manifest("hra", {"conv": entry}),
                                     {"conv.vectors": torch.randn(24, 2)}))
    with pytest.raises(af.UnsupportedError, match=r"module 'conv': PEFT HRA sizes a convolution's rotation by "
                                                  r"kernel_size\[0\]\^2; the kernel 3x1 is not square"):
        af.to_peft(adapter, tmp_path / "never")
    assert not (tmp_path / "never").exists()
