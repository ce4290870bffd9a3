"""The reference RTN quantiser (spec 6.12) against llama.cpp's own quantisation (gguf-py's numpy port of
ggml-quants.c, installed), the base quantisation record, and PEQA (kind ``qscale``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from adapterfmt.plugins.methods.quant import quantize_model
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import adapterfmt as af
from adapterfmt.format.quant import round_half_away
from adapterfmt.tiny import TinyConfig, build_tiny

CFG = {"target_modules": ["q_proj", "down_proj"]}


def _weight(seed: int, out: int = 6, n: int = 64) -> torch.Tensor:
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed))


def _tiny() -> torch.nn.Module:
    return build_tiny(0, TinyConfig(vocab_size=32, hidden=16, layers=1, heads=2, intermediate=32))


# ----- the quantiser against llama.cpp ----------------------------------------------------------------
def test_symmetric_8_bit_groups_of_32_are_q8_0_bit_for_bit():
    w = _weight(0) * 3
    q = af.quantize(w, af.QuantSpec(8, 32, "symmetric"))
    blocks = gguf_quantize(w.numpy(), GGMLQuantizationType.Q8_0).reshape(-1, 34)  # fp16 d, 32 int8 codes
    assert np.array_equal(q.codes.numpy().reshape(-1, 32), blocks[:, 2:].view(np.int8))
    assert np.array_equal(q.scale.half().numpy().reshape(-1), blocks[:, :2].copy().view(np.float16).reshape(-1))
    # dequantised with the fp16 scales Q8_0 stores: llama.cpp's values exactly
    ours = af.dequantize(q, scale=q.scale.half().float())
    assert torch.equal(ours, torch.from_numpy(gguf_dequantize(blocks.reshape(6, -1), GGMLQuantizationType.Q8_0)))


@pytest.mark.parametrize(("bits", "qtype"), [(4, GGMLQuantizationType.Q4_1), (5, GGMLQuantizationType.Q5_1)])
def test_asymmetric_4_and_5_bit_groups_of_32_are_q4_1_and_q5_1(bits, qtype):
    w = _weight(bits)
    q = af.quantize(w, af.QuantSpec(bits, 32, "asymmetric"))
    raw = gguf_quantize(w.numpy(), qtype)
    blocks = raw.reshape(-1, raw.shape[1] // 2)
    d = blocks[:, :2].copy().view(np.float16).reshape(-1)
    m = blocks[:, 2:4].copy().view(np.float16).reshape(-1)
    assert np.array_equal(q.scale.half().numpy().reshape(-1), d)
    assert np.array_equal(q.offset.half().numpy().reshape(-1), m)
    # codes: recovered from llama.cpp's dequantisation, which is q * d + m in float32
    ref = torch.from_numpy(gguf_dequantize(raw, qtype)).reshape(-1, 32)
    half = af.Quantized(q.spec, q.codes, q.scale.half().float(), q.offset.half().float(), q.shape)
    assert torch.equal(af.dequantize(half).reshape(-1, 32), ref)


def _gptq(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's reference asymmetric quantiser (IST-DASLab/gptq ``quant.py``: ``find_params`` on each group, then
    ``quantize``), written out: ``(scale, zero, codes)``."""
    x = w.reshape(-1, group)
    maxq = 2 ** bits - 1
    xmin = torch.minimum(x.min(1).values, torch.zeros(x.shape[0]))
    xmax = torch.maximum(x.max(1).values, torch.zeros(x.shape[0]))
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1, 1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    codes = torch.clamp(torch.round(x / scale[:, None]) + zero[:, None], 0, maxq)
    return scale, zero, codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_integer_zero_point_is_gptqs_grid_bit_for_bit(bits):
    w = _weight(bits) * 0.1
    w[1] = w[1].abs() + 0.05  # all positive: the range is widened to 0
    w[2, :16] = 0  # a group of zeros: GPTQ's [-1, 1]
    w[3, 16:32] = 2.5 * (2 ** bits - 1) / 2 ** bits  # ties for the rounding
    q = af.quantize(w, af.QuantSpec(bits, 16, "integer"))
    scale, zero, codes = _gptq(w, bits, 16)
    assert torch.equal(q.scale.reshape(-1), scale) and torch.equal(q.offset.reshape(-1), zero)
    assert torch.equal(q.codes.reshape(-1, 16).float(), codes) and q.codes.dtype == torch.uint8
    assert torch.equal(af.dequantize(q).reshape(-1, 16), scale[:, None] * (codes - zero[:, None]))
    _, again = af.requantize(af.dequantize(q), q.spec, q.scale, q.offset)
    assert torch.equal(again, af.dequantize(q))


def test_round_half_away_from_zero_is_exact():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 3.0])
    assert round_half_away(x).tolist() == [1, 2, 3, -1, -3, 0, 0, 3]


@pytest.mark.parametrize("zero_point", ["symmetric", "asymmetric", "integer"])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_in_range_error_within_half_a_step_and_on_grid(bits, group_size, zero_point):
    spec = af.QuantSpec(bits, group_size, zero_point)
    w = _weight(bits)
    q = af.quantize(w, spec)
    lo, hi = spec.levels
    assert int(q.codes.min()) >= lo and int(q.codes.max()) <= hi
    assert q.scale.shape == (6, 64 // (group_size or 64))
    step = q.scale.repeat_interleave(group_size or 64, 1)
    assert bool(((af.dequantize(q) - w).abs() <= step / 2 + 1e-6).all())
    assert af.fits_grid(af.fake_quantize(w, spec), spec)
    assert not af.fits_grid(w, spec)
    assert af.fits_grid(af.fake_quantize(w.half(), spec), spec)  # a dequantised fp16 base


def test_constant_group_and_bad_records():
    q = af.quantize(torch.full((2, 8), 0.25), af.QuantSpec(3, 4, "asymmetric"))
    assert torch.equal(af.dequantize(q), torch.full((2, 8), 0.25))
    assert torch.equal(af.fake_quantize(torch.zeros(2, 8), af.QuantSpec(4)), torch.zeros(2, 8))
    for bad in ({"method": "rtn", "bits": 9}, {"method": "gptq", "bits": 4}, {"method": "rtn", "bits": 4, "x": 1},
                {"method": "rtn", "bits": 4, "zero_point": "none"}, {"method": "rtn", "bits": 4, "group_size": 0}):
        with pytest.raises(af.FormatError, match="base.quantization"):
            af.QuantSpec.from_json(bad, what="base.quantization")
    with pytest.raises(af.FormatError, match="group_size 5 does not divide"):
        af.quantize(torch.zeros(2, 8), af.QuantSpec(4, 5))


# ----- the base record --------------------------------------------------------------------------------
def _lora_on(model: torch.nn.Module, record: dict | None) -> af.Adapter:
    session = af.registry.get_method("lora").train(copy.deepcopy(model), config={**CFG, "r": 2})
    with torch.no_grad():
        for p in session.parameters():
            p.add_(0.1)
    session.base_quantization = record
    adapter = session.extract()
    session.remove()
    return adapter


def test_adapter_made_on_a_4_bit_base_is_refused_on_the_fp_base_unless_forced(tmp_path):
    spec = af.QuantSpec(4, 8, "asymmetric")
    base = _tiny()
    q4 = copy.deepcopy(base)
    assert quantize_model(q4, spec, CFG) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    adapter = _lora_on(q4, spec.to_json())
    af.save(adapter, tmp_path / "a.safetensors")
    loaded = af.load(tmp_path / "a.safetensors")
    assert loaded.base["quantization"] == {"method": "rtn", "bits": 4, "group_size": 8, "zero_point": "asymmetric"}
    with pytest.raises(af.BaseMismatchError, match=r"down_proj'.*quantised to 4 bits \(group 8, asymmetric\)"):
        af.attach(copy.deepcopy(base), loaded)
    with pytest.raises(af.BaseMismatchError, match="not on that grid"):  # another grid: 3 bits
        af.attach(quantize_model_copy(base, af.QuantSpec(3, 8, "asymmetric")), loaded)
    af.attach(copy.deepcopy(q4), loaded)
    af.attach(copy.deepcopy(base), loaded, force=True)
    af.attach(copy.deepcopy(base), _lora_on(base, None))  # no record, no check


def quantize_model_copy(model: torch.nn.Module, spec: af.QuantSpec) -> torch.nn.Module:
    out = copy.deepcopy(model)
    quantize_model(out, spec, CFG)
    return out


def test_a_bad_base_record_is_refused_on_load(tmp_path):
    adapter = _lora_on(_tiny(), {"method": "rtn", "bits": 4})
    adapter.manifest["base"]["quantization"]["bits"] = 9
    with pytest.raises(af.FormatError, match="base/quantization"):
        af.save(adapter, tmp_path / "a.safetensors")


# ----- PEQA / qscale ----------------------------------------------------------------------------------
def _peqa(model: torch.nn.Module, config: dict, seed: int = 0) -> tuple[af.Adapter, torch.nn.Module]:
    session = af.registry.get_method("peqa").train(copy.deepcopy(model), config=config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in session.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return session.extract(), session.model


@pytest.mark.parametrize("zero_point", ["symmetric", "asymmetric", "integer"])
def test_qscale_is_new_scales_on_the_base_grid(zero_point):
    spec = af.QuantSpec(3, 8, zero_point)
    cfg = {**CFG, **spec.to_json()}
    del cfg["method"]
    base = _tiny()
    q3 = quantize_model_copy(base, spec)
    adapter, _ = _peqa(q3, cfg)
    assert adapter.base["quantization"] == spec.to_json()
    path = "model.layers.0.mlp.down_proj"
    ratio = adapter.module_tensors(path)["ratio"]
    w = q3.get_submodule(path).weight.detach()
    # the paper's W' = s' (W_int - z), z = -m / s, written out from the codes
    q = af.quantize(w, spec)
    s_new = ratio * q.scale
    z = q.offset if spec.integer_zero else torch.zeros_like(q.scale) if q.offset is None else -q.offset / q.scale
    paper = (s_new[..., None] * (q.codes.reshape(16, 4, 8).float() - z[..., None])).reshape(16, 32)
    # on a dequantised base the new weight is ratio * W per group; swapping the scales gives the same
    merged = copy.deepcopy(q3)
    af.attach(merged, adapter, merge=True)
    new = merged.get_submodule(path).weight.detach()
    torch.testing.assert_close(new, (ratio.repeat_interleave(8, 1) * w), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new, af.dequantize(q, scale=s_new), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new, paper, rtol=1e-5, atol=1e-6)
    # on the unquantised base: PEQA's RTN of that base first, then the new scales
    fp = copy.deepcopy(base)
    af.attach(fp, adapter, merge=True, force=True)
    torch.testing.assert_close(fp.get_submodule(path).weight.detach(), new, rtol=1e-6, atol=1e-6)


def test_peqa_trains_only_the_scales_and_its_config_is_strict():
    method = af.registry.get_method("peqa")
    session = method.train(_tiny(), config={**CFG, "group_size": 8})
    names = dict(session.named_parameters())
    assert sorted(names) == ["model.layers.0.mlp.down_proj.ratio", "model.layers.0.self_attn.q_proj.ratio"]
    assert names["model.layers.0.mlp.down_proj.ratio"].shape == (16, 4)
    assert sum(p.numel() for p in session.model.parameters() if p.requires_grad) == 16 * 4 + 16 * 2
    session.remove()
    with pytest.raises(af.FormatError, match="unknown key"):
        method.train(_tiny(), config={**CFG, "bitz": 4})
    with pytest.raises(af.FormatError, match="bits"):
        method.train(_tiny(), config={**CFG, "bits": 9})
    with pytest.raises(af.FormatError, match="group_size 5 does not divide"):
        method.train(_tiny(), config={**CFG, "group_size": 5})


def test_peqa_ports_only_onto_the_same_grid():
    spec = af.QuantSpec(4, None, "asymmetric")
    base = _tiny()
    q4 = quantize_model_copy(base, spec)
    adapter, _ = _peqa(q4, dict(CFG))
    method = af.registry.get_method("peqa")
    other = build_tiny(1, TinyConfig(vocab_size=32, hidden=16, layers=1, heads=2, intermediate=32))
    with pytest.raises(af.BaseMismatchError, match="same quantisation grid"):
        method.port(adapter, new_base=other)
    ported = method.port(adapter, new_base=quantize_model_copy(other, spec))
    assert ported.base["quantization"] == spec.to_json()
    assert ported.base["fingerprint"] == af.fingerprint_module(quantize_model_copy(other, spec))


# ----- nf4 / fp4 storage codecs -----------------------------------------------------------------------
def _bnb_quantize_4bit(x: torch.Tensor, code: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' torch ("default" backend) blockwise 4-bit quantisation, transcribed from
    bitsandbytes/backends/default/ops.py (``quantize_4bit``, commit 0155ecc6): per block ``absmax``, then
    ``argmin |clamp(x * (1 / absmax), -1, 1) - code|``; returns the unpacked indices and the absmax."""
    flat = x.reshape(-1)
    n, rem = flat.numel(), flat.numel() % block
    absmax = torch.zeros(n // block + bool(rem))
    full = flat[: n - rem].reshape(-1, block)
    absmax[: n // block] = full.abs().max(dim=-1)[0]
    scaled = torch.clamp(full * (1 / absmax[: n // block].view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        absmax[-1] = flat[n - rem:].abs().max()
        scaled = torch.cat([scaled, torch.clamp(flat[n - rem:] * (1 / absmax[-1]), -1, 1)])
    return torch.argmin(torch.abs(scaled.view(-1, 1) - code), dim=-1), absmax


BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]
"""bitsandbytes/backends/utils.py ``_NF4_QUANT_TABLE`` (commit 0155ecc6), float32."""
BNB_FP4_CPU = [0.0, 0.0052, 0.6667, 1.0, 0.3333, 0.5, 0.1667, 0.25, 0.0, -0.0052, -0.6667, -1.0, -0.3333, -0.5,
               -0.1667, -0.25]
"""bitsandbytes/backends/utils.py ``_FP4_QUANT_TABLE``: its CPU table, ``get_4bit_type("fp4")`` to 4 decimals."""


@pytest.mark.parametrize(("codec", "block"), [("nf4", 64), ("nf4", 16), ("fp4", 64), ("fp4", 7)])
def test_nf4_and_fp4_codecs_are_bitsandbytes_blockwise_4_bit(tmp_path, codec, block):
    from adapterfmt.format.bitpack import unpack_nibbles
    from adapterfmt.format.codecs import FP4_CODE, NF4_CODE, encode, get_codec

    assert list(NF4_CODE) == BNB_NF4
    assert torch.allclose(torch.tensor(FP4_CODE), torch.tensor(BNB_FP4_CPU), atol=5e-5)
    x = _weight(block, 9, 40) * 0.3
    x[0, :5] = 0  # a tie-free zero, and a block of zeros below
    x[8] = 0
    parts, spec = encode(codec, x, block_size=block)
    code = torch.tensor(FP4_CODE if codec == "fp4" else BNB_NF4)
    ref_codes, ref_absmax = _bnb_quantize_4bit(x, code, block)
    ref_absmax = ref_absmax.nan_to_num()  # bitsandbytes divides by a zero absmax; every value decodes to 0 anyway
    assert torch.equal(parts["absmax"], ref_absmax)
    codes = unpack_nibbles(parts["q"], x.numel(), what="codes").long()
    nonzero = ref_absmax.repeat_interleave(block)[: x.numel()] > 0
    assert torch.equal(codes[nonzero], ref_codes[nonzero])
    decoded = get_codec(codec).decode(parts, spec)  # bitsandbytes' dequantize_4bit: code[c] * absmax
    assert torch.equal(decoded.reshape(-1), code[ref_codes].nan_to_num() * ref_absmax.repeat_interleave(block)[:360])
    assert spec == {"codec": codec, "shape": [9, 40], "dtype": "F32", "block_size": block}
    assert parts["q"].numel() == 180 and parts["absmax"].numel() == -(-360 // block)


def test_compress_quantize_stores_nf4(tmp_path):
    adapter = _lora_on(_tiny(), None)
    small = af.compress_adapter(adapter, steps=[{"method": "quantize", "codec": "nf4", "group_size": 16}])
    entry = small.modules["model.layers.0.self_attn.q_proj"]
    assert {s["codec"] for s in entry["encoding"].values()} == {"nf4"}
    af.save(small, tmp_path / "a.safetensors")
    back = af.load(tmp_path / "a.safetensors")
    ref = adapter.module_tensors("model.layers.0.self_attn.q_proj")["lora_A"]
    got = back.module_tensors("model.layers.0.self_attn.q_proj")["lora_A"]
    assert 0 < float((got - ref).abs().max()) <= float(ref.abs().max()) * 0.2
    with pytest.raises(af.UnsupportedError, match="bits=8 with codec 'nf4'"):
        af.compress_adapter(adapter, steps=[{"method": "quantize", "codec": "nf4", "bits": 8}])


def test_qscale_on_a_base_held_quantised_swaps_its_scales():
    from adapterfmt.plugins.methods.quant import QuantizedLinear

    spec = af.QuantSpec(4, 8, "asymmetric")
    base = _tiny()
    deq, packed = quantize_model_copy(base, spec), copy.deepcopy(base)
    quantize_model(packed, spec, CFG, pack=True)
    down = packed.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(down, QuantizedLinear) and down.codes.dtype == torch.uint8
    x = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(3))
    assert torch.equal(packed(x), deq(x))
    cfg = {**CFG, "group_size": 8}
    session = af.registry.get_method("peqa").train(packed, config=cfg)  # trained on the packed base itself
    with torch.no_grad():
        for p in session.parameters():
            p.add_(0.1)
    trained, adapter = session.model(x), session.extract()
    session.remove()
    assert adapter.base["quantization"] == spec.to_json()
    scale, offset = down.scale.clone(), down.offset.clone()
    af.attach(packed, adapter)
    torch.testing.assert_close(packed(x), trained, rtol=0, atol=0)
    af.merge_into(packed, "peqa")  # merged = the new scales
    ratio = adapter.module_tensors("model.layers.0.mlp.down_proj")["ratio"]
    assert torch.equal(down.scale, scale * ratio) and torch.equal(down.offset, offset * ratio)
    torch.testing.assert_close(packed(x), trained, rtol=1e-5, atol=1e-6)
    af.unmerge(packed, "peqa")
    assert torch.equal(down.scale, scale) and torch.equal(down.offset, offset)
    af.attach(deq, adapter)  # the dequantised base gives the same model
    torch.testing.assert_close(deq(x), trained, rtol=1e-5, atol=1e-6)
    with pytest.raises(af.FormatError, match="held quantised"):
        af.registry.get_method("peqa").train(copy.deepcopy(packed), config={**CFG, "group_size": 16})


# ----- L4Q ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_point", ["symmetric", "asymmetric", "integer"])
def test_l4q_rounds_w_plus_dw_onto_the_learned_grid(zero_point):
    spec = af.QuantSpec(3, 8, zero_point)
    cfg = {**CFG, "bits": 3, "group_size": 8, "zero_point": zero_point, "r": 2, "alpha": 4}
    base = _tiny()
    session = af.registry.get_method("l4q").train(copy.deepcopy(base), config=cfg)
    x = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(session.model(x), quantize_model_copy(base, spec)(x), rtol=0, atol=0)  # starts at RTN
    loss = session.model(x).square().mean()
    loss.backward()  # straight-through: the rounding passes gradients to A, B and the step sizes
    grads = {n: p.grad for n, p in session.named_parameters()}
    assert all(g is not None and float(g.abs().sum()) > 0 for n, g in grads.items() if not n.endswith("lora_A"))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in session.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    adapter = session.extract()
    session.remove()
    path = "model.layers.0.mlp.down_proj"
    t = adapter.module_tensors(path)
    w = base.get_submodule(path).weight.detach()
    # the definition written out: V = W + (alpha / r) B A; W' = s' clamp(round((V - m') / s')) + m'
    q = af.quantize(w, spec)
    s_new = t["ratio"] * q.scale
    m_new = torch.zeros_like(s_new) if q.offset is None else t["ratio"] * q.offset
    v = (w + 2.0 * t["lora_B"] @ t["lora_A"]).reshape(16, 4, 8) - m_new[..., None]
    u = v / s_new[..., None]
    codes = (torch.sign(u) * (u.abs() + 0.5).floor()).clamp(-3, 3) if zero_point == "symmetric" else \
        (u + 0.5).floor().clamp(0, 7)
    expected = (codes * s_new[..., None] + m_new[..., None]).reshape(16, 32)
    if zero_point == "integer":  # W' = s' (clamp(round(V / s') + z) - z), z fixed
        z = q.offset[..., None]
        v = (w + 2.0 * t["lora_B"] @ t["lora_A"]).reshape(16, 4, 8)
        expected = ((torch.round(v / s_new[..., None]) + z).clamp(0, 7) - z) * s_new[..., None]
        expected = expected.reshape(16, 32)
    merged = copy.deepcopy(base)
    af.attach(merged, adapter, merge=True)
    torch.testing.assert_close(merged.get_submodule(path).weight.detach(), expected, rtol=1e-6, atol=1e-6)
    # on a base held quantised, the merge writes the new codes and scales
    packed = copy.deepcopy(base)
    quantize_model(packed, spec, CFG, pack=True)
    af.attach(packed, adapter)
    unmerged = packed(x)
    module = packed.get_submodule(path)
    before = module.codes.clone()
    af.merge_into(packed, "l4q")
    assert torch.equal(module.scale, s_new) and not torch.equal(module.codes, before)
    torch.testing.assert_close(packed(x), unmerged, rtol=1e-5, atol=1e-6)
    af.unmerge(packed, "l4q")
    assert torch.equal(module.codes, before)


def test_bake_refuses_a_checkpoint_off_the_recorded_grid(tmp_path):
    from safetensors.torch import save_file

    from adapterfmt.format.fingerprint import module_state
    from adapterfmt.verbs.bake import bake

    spec = af.QuantSpec(4, 8, "asymmetric")
    base = _tiny()
    q4 = quantize_model_copy(base, spec)
    adapter = _lora_on(q4, spec.to_json())
    adapter.manifest["base"]["fingerprint"] = None  # only the grid can tell these checkpoints apart
    for name, model in (("fp", base), ("q4", q4)):
        save_file({k: v.detach().contiguous() for k, v in module_state(model).items()}, tmp_path / f"{name}.safetensors")
    with pytest.raises(af.BaseMismatchError, match=r"down_proj.weight: .*quantised to 4 bits.*not on that grid"):
        bake([adapter], tmp_path / "fp.safetensors", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    bake([adapter], tmp_path / "q4.safetensors", tmp_path / "out.safetensors")
    bake([adapter], tmp_path / "fp.safetensors", tmp_path / "forced.safetensors", force=True)


def test_cli_compress_with_the_nf4_codec(tmp_path):
    from helpers_spec import invoke

    af.save(_lora_on(_tiny(), None), tmp_path / "a.safetensors")
    r = invoke("compress", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "b.safetensors"),
               "--codec", "nf4", "--quant-group-size", "32")
    assert r.exit_code == 0, r.output
    entry = af.load(tmp_path / "b.safetensors").modules["model.layers.0.mlp.down_proj"]
    assert {s["codec"] for s in entry["encoding"].values()} == {"nf4"}
    assert {s["block_size"] for s in entry["encoding"].values()} == {32}
    r = invoke("compress", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "c.safetensors"),
               "--codec", "nf4", "--bits", "8")
    assert r.exit_code != 0 and "bits=8 with codec 'nf4'" in r.output
    assert not (tmp_path / "c.safetensors").exists()


def test_lora_attaches_and_trains_on_a_base_held_quantised():
    """A LoRA over a QuantizedLinear computes on its dequantisation (the same model as on the dequantised
    base); it trains there, never merges into the codes, and kinds that change the weight refuse the module."""
    spec = af.QuantSpec(4, 8, "asymmetric")
    base = _tiny()
    deq, packed = quantize_model_copy(base, spec), copy.deepcopy(base)
    quantize_model(packed, spec, CFG, pack=True)
    x = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(3))
    session = af.registry.get_method("lora").train(packed, config={**CFG, "r": 2})
    assert sorted(session.layers) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        for p in session.parameters():
            p.add_(0.1)
    packed(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in session.parameters())
    trained, adapter = session.model(x), session.extract()
    session.remove()
    af.attach(packed, adapter)
    torch.testing.assert_close(packed(x), trained, rtol=0, atol=0)
    af.attach(deq, adapter)
    torch.testing.assert_close(deq(x), trained, rtol=1e-5, atol=1e-6)
    with pytest.raises(af.UnsupportedError, match="QuantizedLinear, which holds its weight quantised"):
        af.merge_into(packed, "lora")
    torch.testing.assert_close(packed(x), trained, rtol=0, atol=0)  # nothing half-merged
    ia3 = af.registry.get_method("ia3").train(_tiny(), config={"target_modules": ["down_proj"]})
    with pytest.raises(af.BaseMismatchError, match="holds its weight quantised; kind 'vector'"):
        af.attach(packed, ia3.extract())


def test_base_quantization_is_a_must_understand_feature(tmp_path):
    import json

    adapter = _lora_on(_tiny(), af.QuantSpec(4).to_json())
    assert adapter.manifest["must_understand"] == ["adapterfmt.base_quantization"]
    af.save(adapter, tmp_path / "a")
    assert af.load(tmp_path / "a").base["quantization"]["bits"] == 4
    manifest = json.loads((tmp_path / "a" / "adapter.json").read_text())
    del manifest["must_understand"]
    (tmp_path / "a" / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(af.FormatError, match="must_understand does not list adapterfmt.base_quantization"):
        af.load(tmp_path / "a")
    assert "must_understand" not in _lora_on(_tiny(), None).manifest
