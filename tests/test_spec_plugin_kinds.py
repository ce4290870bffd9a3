"""The built-in plugins' delta kinds mean exactly what spec section 6.10 says.

For each kind a tiny adapter is written to disk and read back, then its dW and its unmerged forward are
recomputed with numpy from the spec text alone (section 6.10.x, noted at each function) and compared with
``kind.delta`` and with the model after ``af.attach`` (unmerged and merged), in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_spec import EXAMPLES
from test_spec_examples import _np
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterfmt as af
from adapterfmt.format import golden

ATOL = 1e-5  # float32


# ----- the spec's math, written out in numpy ---------------------------------------------------------------
def function_shape(entry: dict) -> tuple[int, ...]:
    """6.1: F = reverse(S) when params.transposed, else S."""
    s = tuple(entry["shape"])
    return s[::-1] if entry.get("params", {}).get("transposed") else s


def stored(entry: dict, dw_f: np.ndarray) -> np.ndarray:
    """6.10 common rules: dW = transpose(dW_f) if transposed, else dW_f."""
    return dw_f.T if entry.get("params", {}).get("transposed") else dw_f


def hadamard_dw(entry: dict, t: dict[str, np.ndarray]) -> np.ndarray:
    """6.10.1: reshape(scale * ((w1_a @ w1_b) ⊙ (w2_a @ w2_b)), F), row-major."""
    scale = entry["params"].get("scale", 1.0)
    prod = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    return stored(entry, (scale * prod).reshape(function_shape(entry)))


def kron(w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """6.10.2: kron(w1, w2)[i*c + k, j*d + l, ...] = w1[i, j] * w2[k, l, ...] (w1 gets unit dims if w2 is 4-D)."""
    (a, b), (c, d) = w1.shape, w2.shape[:2]
    return np.einsum("ij,kl...->ikjl...", w1, w2).reshape(a * c, b * d, *w2.shape[2:])


def kronecker_dw(entry: dict, t: dict[str, np.ndarray]) -> np.ndarray:
    """6.10.2: dW_f = reshape(scale * kron(w1, w2), F); a factor is stored whole or as a pair a @ b."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    scale = entry["params"].get("scale", 1.0)
    return stored(entry, (scale * kron(w1, w2)).reshape(function_shape(entry)))


def vera_dw(entry: dict, t: dict[str, np.ndarray]) -> np.ndarray:
    """6.10.3: dW_f[o, i] = lambda_b[o] * sum_k vera_B[o, k] * lambda_d[k] * vera_A[k, i] (leading slices)."""
    out, n_in = function_shape(entry)
    a, b = t["vera_A"][:, :n_in], t["vera_B"][:out, :]
    dw = np.zeros((out, n_in))
    for o in range(out):
        for i in range(n_in):
            dw[o, i] = t["lambda_b"][o] * sum(b[o, k] * t["lambda_d"][k] * a[k, i] for k in range(len(t["lambda_d"])))
    return stored(entry, dw)


def rows_merged(t: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray:
    """6.10.4: W'[indices[j], :] = values[j]; other rows unchanged."""
    new = w.copy()
    for j, row in enumerate(t["indices"]):
        new[row, :] = t["values"][j]
    return new


def dept_output(entry: dict, t: dict[str, np.ndarray], y: np.ndarray) -> np.ndarray:
    """6.10.5: z = y + O[t] for t < max_length (O = scale * offset_A @ offset_B), then prefix embeddings."""
    o = entry["params"].get("scale", 1.0) * (t["offset_A"] @ t["offset_B"])
    z = y.copy()
    for pos in range(min(y.shape[-2], o.shape[0])):
        z[..., pos, :] += o[pos]
    emb = t["embeddings"]
    if y.ndim == 2:
        return np.concatenate([emb, z], axis=0)
    return np.concatenate([np.broadcast_to(emb, (y.shape[0], *emb.shape)), z], axis=1)


def block_dw(entry: dict, t: dict[str, np.ndarray]) -> np.ndarray:
    """6.10.6: rows dW_f[indices[j], :] = scale * block[j, :]; columns dW_f[:, indices[j]] = scale * block[:, j]."""
    p = entry["params"]
    dw = np.zeros(function_shape(entry))
    for j, k in enumerate(t["indices"]):
        if p["axis"] == "rows":
            dw[k, :] = p.get("scale", 1.0) * t["block"][j, :]
        else:
            dw[:, k] = p.get("scale", 1.0) * t["block"][:, j]
    return stored(entry, dw)


def bat_merged(entry: dict, t: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray:
    """6.10.12 bat: W'_f(m, n) = W_f(m, n) @ (I + block[m]) + block[m] on the r x r blocks of W_f."""
    blk = t["block"]
    r = blk.shape[1]
    w_f = w.T if entry["params"].get("transposed") else w
    new = w_f.copy()
    for m in range(w_f.shape[0] // r):
        for n in range(w_f.shape[1] // r):
            new[m * r:(m + 1) * r, n * r:(n + 1) * r] = w_f[m * r:(m + 1) * r, n * r:(n + 1) * r] @ (np.eye(r) + blk[m]) + blk[m]
    return stored(entry, new)


def rtn(w: np.ndarray, quant: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """6.12's reference quantiser in float32 on ``w`` [out, n] (function layout): ``(q, s, m, z)`` per element,
    the codes and their group's scale, minimum (asymmetric) and zero point (integer), broadcast to ``w``."""
    f32, b = np.float32, quant["bits"]
    out, n = w.shape
    g = quant["group_size"] or n
    wg = w.astype(f32).reshape(out, n // g, g)

    def inv(s):
        return np.where(s == 0, f32(0), f32(1) / np.where(s == 0, f32(1), s)).astype(f32)

    zero = np.zeros_like(wg[..., :1])
    if quant["zero_point"] == "symmetric":
        big_q = f32(2 ** (b - 1) - 1)
        s = (np.abs(wg).max(-1, keepdims=True) / big_q).astype(f32)
        a = np.abs(wg * inv(s))
        q = np.clip(np.sign(wg) * (np.floor(a) + np.floor(2 * (a - np.floor(a)))), -big_q, big_q)
        m, z = zero, zero
    elif quant["zero_point"] == "asymmetric":
        big_l = f32(2 ** b - 1)
        m = wg.min(-1, keepdims=True)
        s = ((wg.max(-1, keepdims=True) - m) / big_l).astype(f32)
        q = np.clip(np.floor((wg - m) * inv(s) + f32(0.5)), 0, big_l)
        z = zero
    else:
        big_l = f32(2 ** b - 1)
        lo, hi = np.minimum(wg.min(-1, keepdims=True), 0), np.maximum(wg.max(-1, keepdims=True), 0)
        both = (lo == 0) & (hi == 0)
        lo, hi = np.where(both, f32(-1), lo), np.where(both, f32(1), hi)
        s = ((hi - lo) / big_l).astype(f32)
        z = np.rint(-lo / s)
        q = np.clip(np.rint(wg / s) + z, 0, big_l)
        m = zero
    full = [np.broadcast_to(v, wg.shape).reshape(out, n).astype(f32) for v in (q, s, m, z)]
    return full[0], full[1], full[2], full[3]


def qscale_merged(entry: dict, t: dict[str, np.ndarray], w: np.ndarray) -> np.ndarray:
    """6.12 qscale, in float32: PEQA W' = ratio * (q s + m) (symmetric: m = 0; integer: ratio * s (q - z)); with
    lora_A / lora_B (L4Q) the codes of V = W + scale * B @ A are recomputed on s' = ratio * s, m' = ratio * m."""
    p, f32 = entry["params"], np.float32
    quant, b = p["quant"], p["quant"]["bits"]
    w_f = (w.T if p.get("transposed") else w).astype(f32)
    n = w_f.shape[1]
    q, s, m, z = rtn(w_f, quant)
    ratio = np.repeat(t["ratio"].astype(f32), n // t["ratio"].shape[1], axis=1)
    s2, m2 = ratio * s, ratio * m
    if "lora_A" not in t:
        new = ratio * s * (q - z) if quant["zero_point"] == "integer" else ratio * (q * s + m)
    else:
        v = w_f + f32(p.get("scale", 1.0)) * (t["lora_B"].astype(f32) @ t["lora_A"].astype(f32))
        inv = np.where(s2 == 0, f32(0), f32(1) / np.where(s2 == 0, f32(1), s2)).astype(f32)
        if quant["zero_point"] == "symmetric":
            big_q, a = 2 ** (b - 1) - 1, np.abs(v * inv)
            new = s2 * np.clip(np.sign(v) * (np.floor(a) + np.floor(2 * (a - np.floor(a)))), -big_q, big_q)
        elif quant["zero_point"] == "asymmetric":
            new = s2 * np.clip(np.floor((v - m2) * inv + f32(0.5)), 0, 2 ** b - 1) + m2
        else:
            new = s2 * (np.clip(np.rint(v / s2) + z, 0, 2 ** b - 1) - z)
    return stored(entry, new.astype(np.float64))


def mixture_output(entry: dict, t: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """6.10.13: per token x (per sequence: the mean of its rows) l = router @ x (|.| for logits abs); S = the top
    k, ties to the lower index; g = 1 for k = 1, else softmax(l_S / T); y' = y + sum_S g_e s_e B_e (A_e x)."""
    p = entry["params"]
    k, temp = p["top_k"], p.get("temperature", 1.0)
    scales = p.get("scales", [1.0] * len(p["experts"]))
    sequence = p.get("granularity", "token") == "sequence"
    out = y.copy()
    for idx in np.ndindex(*x.shape[:-1]):
        src = x[idx[:-1]].mean(0) if sequence else x[idx]
        l = t["router"] @ src
        l = np.abs(l) if p.get("logits", "dot") == "abs" else l
        chosen = sorted(range(len(l)), key=lambda e: (-l[e], e))[:k]
        g = np.ones(1) if k == 1 else np.exp(l[chosen] / temp) / np.exp(l[chosen] / temp).sum()
        for ge, e in zip(g, chosen):
            out[idx] += ge * scales[e] * t["lora_B"][e] @ (t["lora_A"][e] @ x[idx])
    return out


def llama_with_prefix(model, ids: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The logits of a transformers Llama (eval, no biases) computed in numpy, its stack called as 6.10.14 says:
    layer l's cache holds keys[l] / values[l] (``[n, H, D]``, never rotated) before the ``T`` new positions,
    which are numbered ``n ... n + T - 1`` (RoPE) and attend causally to every prefix position."""
    cfg = model.config
    w = {k: _np(v) for k, v in model.state_dict().items()}
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    n, (batch, steps) = keys.shape[1], ids.shape

    def norm(h, weight):
        return h / np.sqrt((h * h).mean(-1, keepdims=True) + cfg.rms_norm_eps) * weight

    pos = np.arange(n, n + steps)
    inv = 1.0 / cfg.rope_parameters["rope_theta"] ** (np.arange(0, d, 2) / d)
    ang = np.concatenate([pos[:, None] * inv, pos[:, None] * inv], -1)  # [T, D]

    def rope(h):  # [B, heads, T, D]; rotate_half = (-second half, first half)
        return h * np.cos(ang) + np.concatenate([-h[..., d // 2:], h[..., :d // 2]], -1) * np.sin(ang)

    h = w["model.embed_tokens.weight"][ids]
    visible = np.tril(np.ones((steps, n + steps)), k=n).astype(bool)
    for l in range(cfg.num_hidden_layers):
        pre = f"model.layers.{l}."
        a = norm(h, w[pre + "input_layernorm.weight"])
        q, k_, v_ = (a @ w[pre + f"self_attn.{p}_proj.weight"].T for p in "qkv")
        q = rope(q.reshape(batch, steps, heads, d).transpose(0, 2, 1, 3))
        k_ = rope(k_.reshape(batch, steps, kv, d).transpose(0, 2, 1, 3))
        v_ = v_.reshape(batch, steps, kv, d).transpose(0, 2, 1, 3)
        k_all = np.concatenate([np.broadcast_to(keys[l].transpose(1, 0, 2), (batch, kv, n, d)), k_], 2)
        v_all = np.concatenate([np.broadcast_to(values[l].transpose(1, 0, 2), (batch, kv, n, d)), v_], 2)
        rep = heads // kv  # query head i reads key/value head i // rep
        scores = q @ np.repeat(k_all, rep, 1).transpose(0, 1, 3, 2) / np.sqrt(d)
        scores = np.where(visible, scores, -np.inf)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att = att / att.sum(-1, keepdims=True) @ np.repeat(v_all, rep, 1)
        h = h + att.transpose(0, 2, 1, 3).reshape(batch, steps, heads * d) @ w[pre + "self_attn.o_proj.weight"].T
        a = norm(h, w[pre + "post_attention_layernorm.weight"])
        gate = a @ w[pre + "mlp.gate_proj.weight"].T
        h = h + (gate / (1 + np.exp(-gate)) * (a @ w[pre + "mlp.up_proj.weight"].T)) @ w[pre + "mlp.down_proj.weight"].T
    return norm(h, w["model.norm.weight"]) @ w["lm_head.weight"].T


def conv2d(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """Stride-1, groups-1 cross-correlation with zero padding (nn.Conv2d's function, no bias)."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    h, wd = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
    out = np.zeros((x.shape[0], w.shape[0], h, wd))
    for p in range(kh):
        for q in range(kw):
            out += np.einsum("bchw,oc->bohw", xp[:, :, p:p + h, q:q + wd], w[:, :, p, q])
    return out


def module_function(module: nn.Module, x: np.ndarray, w_stored: np.ndarray) -> np.ndarray:
    """The module's function with stored-layout weight ``w_stored``, plus its own bias."""
    b = _np(module.bias.detach())
    if isinstance(module, nn.Conv2d):
        return conv2d(x, w_stored, module.padding[0]) + b[None, :, None, None]
    w_f = w_stored.T if isinstance(module, Conv1D) else w_stored
    return x @ w_f.T + b


# ----- the reference implementation under test -------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.c1d = Conv1D(5, 3)  # GPT-2 layout: weight [in=3, out=5]
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.emb = nn.Embedding(10, 6)


def tiny() -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


GEN = torch.Generator().manual_seed(1234)


def entry(kind: str, shape: list[int], **params) -> dict:
    return {"kind": kind, "shape": shape, "params": params}


def build(kind: str) -> tuple[dict, dict]:
    """(modules, tensors) of a tiny adapter of ``kind`` on the modules of :class:`Tiny`."""
    if kind == "hadamard":
        mods = {"lin": entry("hadamard", [4, 6], scale=0.5), "c1d": entry("hadamard", [3, 5], transposed=True),
                "conv": entry("hadamard", [6, 4, 3, 3], scale=2.0)}
        shapes = {"lin": (4, 2, 3, 6), "c1d": (5, 2, 1, 3), "conv": (6, 2, 2, 36)}  # out, r1, r2, n_in
        tensors = {}
        for m, (out, r1, r2, n_in) in shapes.items():
            tensors |= {f"{m}.hada_w1_a": rnd(out, r1), f"{m}.hada_w1_b": rnd(r1, n_in),
                        f"{m}.hada_w2_a": rnd(out, r2), f"{m}.hada_w2_b": rnd(r2, n_in)}
        return mods, tensors
    if kind == "kronecker":
        mods = {"lin": entry("kronecker", [4, 6], scale=0.25), "c1d": entry("kronecker", [3, 5], transposed=True),
                "conv": entry("kronecker", [6, 4, 3, 3], scale=1.5)}
        tensors = {"lin.lokr_w1": rnd(2, 3), "lin.lokr_w2_a": rnd(2, 1), "lin.lokr_w2_b": rnd(1, 2),
                   "c1d.lokr_w1_a": rnd(5, 2), "c1d.lokr_w1_b": rnd(2, 1), "c1d.lokr_w2": rnd(1, 3),
                   "conv.lokr_w1": rnd(2, 2), "conv.lokr_w2": rnd(3, 2, 3, 3)}
        return mods, tensors
    if kind == "vera":
        shared = {"vera_A": "vera_A", "vera_B": "vera_B"}
        mods = {"lin": entry("vera", [4, 6], shared=shared), "c1d": entry("vera", [3, 5], transposed=True, shared=shared)}
        tensors = {"vera_A": rnd(3, 7), "vera_B": rnd(6, 3), "lin.lambda_b": rnd(4), "lin.lambda_d": rnd(3),
                   "c1d.lambda_b": rnd(5), "c1d.lambda_d": rnd(3)}
        return mods, tensors
    if kind == "rows":
        return {"emb": entry("rows", [10, 6])}, {"emb.indices": torch.tensor([1, 4, 9]), "emb.values": rnd(3, 6)}
    assert kind == "dept"
    mods = {"emb": entry("dept", [10, 6], position="prefix", scale=0.5)}
    return mods, {"emb.embeddings": rnd(2, 6), "emb.offset_A": rnd(5, 2), "emb.offset_B": rnd(2, 6)}


def saved(tmp_path, kind: str) -> af.Adapter:
    modules, tensors = build(kind)
    return af.validate(af.save(af.Adapter(af.new_manifest(kind, modules), tensors), tmp_path / f"{kind}.safetensors"))


def role_arrays(adapter: af.Adapter, module: str) -> dict[str, np.ndarray]:
    """Each role of ``module`` from the stored tensors; shared roles through ``params.shared`` (section 5)."""
    e = adapter.modules[module]
    out = {n[len(module) + 1:]: _np(adapter.tensor(n)) for n in adapter.tensor_names() if n.startswith(module + ".")}
    out |= {role: _np(adapter.tensor(name)) for role, name in e.get("params", {}).get("shared", {}).items()}
    return out


SPEC_DW = {"hadamard": hadamard_dw, "kronecker": kronecker_dw, "vera": vera_dw}
INPUTS = {"lin": (3, 6), "c1d": (2, 3, 3), "conv": (2, 4, 5, 5)}


@pytest.mark.parametrize("kind", list(SPEC_DW))
def test_weight_delta_kinds_follow_the_spec(tmp_path, kind):
    adapter = saved(tmp_path, kind)
    model = tiny()
    base = {k: _np(v) for k, v in model.state_dict().items()}
    expected, xs = {}, {}
    for path, e in adapter.modules.items():
        dw = SPEC_DW[kind](e, role_arrays(adapter, path))
        assert dw.shape == tuple(e["shape"])
        got = af.registry.get_kind(kind).delta(e, adapter.module_tensors(path))
        assert got.dtype == torch.float32
        np.testing.assert_allclose(_np(got), dw, atol=ATOL, rtol=1e-5, err_msg=path)
        expected[path] = dw
        xs[path] = torch.randn(*INPUTS[path], generator=GEN)
    assert af.registry.get_kind(kind).is_additive(adapter.modules[path], adapter.roles(path))

    af.attach(model, adapter)  # unmerged: y' = y + f(x; dW_f) = the module's function with W + dW
    for path, dw in expected.items():
        want = module_function(model.get_submodule(path), _np(xs[path]), base[f"{path}.weight"] + dw)
        np.testing.assert_allclose(_np(model.get_submodule(path)(xs[path]).detach()), want, atol=ATOL, rtol=1e-5,
                                   err_msg=path)
    af.detach(model)

    af.attach(model, adapter, merge=True)  # merged: W' = W + dW, bias unchanged
    for path, dw in expected.items():
        np.testing.assert_allclose(_np(model.get_submodule(path).weight.detach()), base[f"{path}.weight"] + dw,
                                   atol=ATOL, rtol=1e-5, err_msg=path)
        np.testing.assert_array_equal(_np(model.get_submodule(path).bias.detach()), base[f"{path}.bias"])
    af.detach(model)  # unmerge subtracts dW
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(_np(v), base[k], atol=ATOL, err_msg=k)


def test_vera_shared_projections_are_stored_once_and_sliced(tmp_path):
    adapter = saved(tmp_path, "vera")
    assert [n for n in adapter.tensor_names() if "." not in n] == ["vera_A", "vera_B"]
    e = dict(adapter.modules["lin"], params={**adapter.modules["lin"]["params"], "scale": 10.0})
    ignored = af.registry.get_kind("vera").delta(e, adapter.module_tensors("lin"))  # 6.10.3: no scale
    np.testing.assert_allclose(_np(ignored), vera_dw(e, role_arrays(adapter, "lin")), atol=ATOL)


def test_rows_replaces_rows_and_restores_them(tmp_path):
    adapter = saved(tmp_path, "rows")
    kind = af.registry.get_kind("rows")
    assert not kind.is_additive(adapter.modules["emb"], adapter.roles("emb"))
    model = tiny()
    w = _np(model.emb.weight.detach())
    new = rows_merged(role_arrays(adapter, "emb"), w)
    ids = torch.tensor([[0, 1, 4], [9, 2, 1]])
    af.attach(model, adapter)
    np.testing.assert_allclose(_np(model.emb(ids).detach()), new[ids.numpy()], atol=ATOL)
    af.detach(model)
    af.attach(model, adapter, merge=True)
    np.testing.assert_allclose(_np(model.emb.weight.detach()), new, atol=ATOL)
    af.detach(model)
    np.testing.assert_array_equal(_np(model.emb.weight.detach()), w)


@pytest.mark.parametrize("ids_shape", [(2, 7), (2, 3), (7,)], ids=["past_max_length", "short", "unbatched"])
def test_dept_adds_a_per_position_offset_then_prefixes(tmp_path, ids_shape):
    adapter = saved(tmp_path, "dept")
    model = tiny()
    ids = torch.randint(0, 10, ids_shape, generator=GEN)
    y = _np(model.emb(ids).detach())
    want = dept_output(adapter.modules["emb"], role_arrays(adapter, "emb"), y)
    af.attach(model, adapter)
    got = _np(model.emb(ids).detach())
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=ATOL)
    af.detach(model)
    with pytest.raises(af.AdapterError):
        af.attach(model, adapter, merge=True)


# ----- the MUST-refuse rules of 6.10 ----------------------------------------------------------------------
def _broken(kind: str, change) -> af.Adapter:
    modules, tensors = build(kind)
    change(modules, tensors)
    return af.Adapter(af.new_manifest(kind, modules), tensors)


REFUSED = {
    "hadamard_shape": ("hadamard", lambda m, t: t.update({"lin.hada_w2_b": rnd(3, 5)})),
    "kronecker_both_forms": ("kronecker", lambda m, t: t.update({"lin.lokr_w1_a": rnd(2, 1), "lin.lokr_w1_b": rnd(1, 3)})),
    "kronecker_half_pair": ("kronecker", lambda m, t: t.pop("lin.lokr_w2_b")),
    "kronecker_out_mismatch": ("kronecker", lambda m, t: t.update({"lin.lokr_w1": rnd(2, 6),  # [2, 12]
                                                                    "lin.lokr_w2_a": rnd(1, 1)})),
    "vera_no_shared": ("vera", lambda m, t: m["lin"]["params"].pop("shared")),
    "vera_projection_too_small": ("vera", lambda m, t: t.update({"vera_A": rnd(3, 5)})),
    "vera_not_2d": ("vera", lambda m, t: m["lin"].update(shape=[4, 6, 1])),
    "rows_not_increasing": ("rows", lambda m, t: t.update({"emb.indices": torch.tensor([4, 1, 9])})),
    "rows_out_of_range": ("rows", lambda m, t: t.update({"emb.indices": torch.tensor([1, 4, 10])})),
    "rows_not_int64": ("rows", lambda m, t: t.update({"emb.indices": torch.tensor([1, 4, 9], dtype=torch.int32)})),
    "dept_position": ("dept", lambda m, t: m["emb"]["params"].update(position="suffix")),
    "dept_offset_dim": ("dept", lambda m, t: t.update({"emb.offset_B": rnd(2, 5)})),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_entries_the_spec_says_to_refuse_are_refused(case):
    kind, change = REFUSED[case]
    with pytest.raises(af.FormatError):
        af.validate(_broken(kind, change))


def test_transposed_must_match_the_module(tmp_path):
    for kind in SPEC_DW:
        modules, tensors = build(kind)
        modules = {"c1d": dict(modules["c1d"], params={k: v for k, v in modules["c1d"]["params"].items()
                                                        if k != "transposed"})}
        adapter = af.Adapter(af.new_manifest(kind, modules), {n: v for n, v in tensors.items()
                                                               if n.startswith("c1d.") or "." not in n})
        with pytest.raises(af.AdapterError, match="transposed"):
            af.attach(tiny(), adapter)


# ----- the golden examples of these kinds that cannot be merged (spec/examples/) -----------------------------
def golden_part(name: str, path: str) -> af.Adapter:
    """Module ``path`` of golden example ``name`` alone."""
    adapter = af.load(EXAMPLES / f"{name}.safetensors")
    names = [n for n in adapter.tensor_names() if n.startswith(path + ".")]
    return af.Adapter(af.new_manifest(adapter.method, {path: adapter.modules[path]}),
                      {n: adapter.tensor(n) for n in names})


def test_mixture_golden_example_is_the_spec_math():
    adapter = af.load(EXAMPLES / "mixture.safetensors")
    model = golden.golden_base()
    xs = {path: torch.randn(2, 3, model.get_submodule(path).in_features, generator=GEN) for path in adapter.modules}
    want = {}
    for path, e in adapter.modules.items():
        y = _np(model.get_submodule(path)(xs[path]).detach())
        want[path] = mixture_output(e, role_arrays(adapter, path), _np(xs[path]), y)
        assert np.abs(want[path] - y).max() > 0.01
    af.attach(model, adapter)
    for path, x in xs.items():
        np.testing.assert_allclose(_np(model.get_submodule(path)(x).detach()), want[path], atol=ATOL, err_msg=path)
    af.detach(model)
    with pytest.raises(af.UnsupportedError, match="cannot be merged"):
        af.attach(model, adapter, merge=True)


def test_dept_golden_example_is_the_spec_math():
    """spec/examples/prompt_space's dept entry on the golden base's embedding, 7 ids past max_length 5."""
    path = golden.EMBED
    adapter = golden_part("prompt_space", path)
    model = golden.golden_base()
    ids = torch.tensor([[1, 4, 2, 9, 15, 0, 3], [5, 5, 6, 7, 8, 2, 1]])
    want = dept_output(adapter.modules[path], role_arrays(adapter, path), _np(model.get_submodule(path)(ids).detach()))
    af.attach(model, adapter)
    np.testing.assert_allclose(_np(model.get_submodule(path)(ids).detach()), want, atol=ATOL)


def test_prefix_golden_example_on_a_tiny_llama_is_the_spec_math():
    """The golden base has no decoder stack: spec/examples/prompt_space's prefix entry is checked on a tiny Llama
    with the golden base's module shapes (1 layer, 4 query heads and 2 key/value heads of dimension 2), against
    that Llama written out in numpy with the prefix as 6.10.14 says."""
    from transformers import LlamaConfig, LlamaForCausalLM

    adapter = golden_part("prompt_space", "model")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=1, vocab_size=16,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                         max_position_embeddings=32)).eval()
    shapes = {n: tuple(p.shape) for n, p in golden.golden_base().named_parameters()
              if n.startswith("model.") and n.endswith("weight")}
    assert all(tuple(llama.get_parameter(n).shape) == s for n, s in shapes.items())
    ids = torch.tensor([[1, 4, 2, 9, 15], [5, 5, 6, 7, 8]])
    t = role_arrays(adapter, "model")
    with torch.no_grad():
        base = _np(llama(ids).logits)
        no_prefix = llama_with_prefix(llama, ids.numpy(), np.zeros((1, 0, 2, 2)), np.zeros((1, 0, 2, 2)))
        np.testing.assert_allclose(base, no_prefix, atol=ATOL)  # the numpy Llama is the Llama
        want = llama_with_prefix(llama, ids.numpy(), t["keys"], t["values"])
        assert np.abs(want - base).max() > 1e-3
        af.attach(llama, adapter)
        np.testing.assert_allclose(_np(llama(ids).logits), want, atol=ATOL)
