"""Every apply path (the fast torch path and the Triton kernel) against its reference.

The Triton cases run on the CPU through ``TRITON_INTERPRET=1`` (or natively on a GPU); shapes stay small because
the interpreter is slow, with odd sizes (33, 65) everywhere and one wide (2049) case.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES

from adapterfmt import kernels as K
from adapterfmt.kernels import reference as R

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def dev(request: pytest.FixtureRequest) -> str:
    """The device for this backend (the backend is set through ADAPTERFMT_KERNELS)."""
    return request.getfixturevalue(f"{request.param}_backend")


def _rand(g: torch.Generator, *shape: int, dtype: torch.dtype, device: str, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "n_in", "n_out", "r", "bias"), [(1, 33, 65, 1, True), (7, 65, 33, 16, False),
                                                               (20, 33, 17, 64, True)])
def test_lora_linear(dev: str, dtype: torch.dtype, m: int, n_in: int, n_out: int, r: int, bias: bool,
                     matches) -> None:
    g = torch.Generator().manual_seed(m * 1000 + r)
    x = _rand(g, m, n_in, dtype=dtype, device=dev)
    w = _rand(g, n_out, n_in, dtype=dtype, device=dev, scale=n_in ** -0.5)
    A = _rand(g, r, n_in, dtype=dtype, device=dev, scale=n_in ** -0.5)
    B = _rand(g, n_out, r, dtype=dtype, device=dev)
    b = _rand(g, n_out, dtype=dtype, device=dev) if bias else None
    out = K.lora_linear(x, w, A, B, 2.0, b)
    matches(out, R.lora_linear_ref(x, w, A, B, 2.0, b), dtype)
    # the adapter part is really there: dropping it changes the result beyond the tolerance
    assert (out.float() - R.lora_linear_ref(x, w, A, B, 0.0, b).float()).abs().max() > 0.05


def test_lora_linear_leading_dims(dev: str, matches) -> None:
    g = torch.Generator().manual_seed(1)
    x = _rand(g, 2, 3, 33, dtype=torch.float32, device=dev)
    w, A, B = (_rand(g, *s, dtype=torch.float32, device=dev) for s in [(17, 33), (4, 33), (17, 4)])
    out = K.lora_linear(x, w, A, B, 0.5)
    assert out.shape == (2, 3, 17)
    matches(out, R.lora_linear_ref(x, w, A, B, 0.5), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_delta_in_place_and_alone(dev: str, dtype: torch.dtype, matches) -> None:
    g = torch.Generator().manual_seed(2)
    x = _rand(g, 5, 65, dtype=dtype, device=dev)
    A = _rand(g, 8, 65, dtype=dtype, device=dev, scale=0.1)
    B = _rand(g, 33, 8, dtype=dtype, device=dev)
    y = _rand(g, 5, 33, dtype=dtype, device=dev)
    target = y.clone()
    ret = K.lora_delta(x, A, B, 1.5, out=target)
    assert ret is target
    matches(target, R.lora_delta_ref(x, A, B, 1.5, y), dtype)
    alone = K.lora_delta(x, A, B, 1.5)
    matches(alone, R.lora_delta_ref(x, A, B, 1.5), dtype)


def test_lora_delta_wide_hidden(dev: str, matches) -> None:
    """A ~2049-wide input: many K steps and a ragged last tile."""
    g = torch.Generator().manual_seed(3)
    x = _rand(g, 2, 2049, dtype=torch.float32, device=dev)
    A = _rand(g, 4, 2049, dtype=torch.float32, device=dev, scale=2049 ** -0.5)
    B = _rand(g, 17, 4, dtype=torch.float32, device=dev)
    y = torch.zeros(2, 17, device=dev)
    matches(K.lora_delta(x, A, B, 1.0, out=y.clone()), R.lora_delta_ref(x, A, B, 1.0, y), torch.float32)


ROWS_CASES = [  # (rows, ranks of the adapters, popularity, dtype)
    (1, [16], "uniform", torch.float32),
    (9, [1, 8, 3], "skewed", torch.float16),
    (24, [8] * 8, "uniform", torch.bfloat16),
    (40, [1, 2, 4, 8, 16, 32, 64, 5], "skewed", torch.float32),
    (33, [64, 1], "uniform", torch.float16),
    (6, [4, 64, 2, 9, 16, 1, 32, 8], "skewed", torch.bfloat16),  # torch: gathered-pool bmm path
    (12, [3, 5, 7, 2, 8, 1, 6, 4, 16, 9, 11, 13], "uniform", torch.float32),  # gathered: T <= n adapters
]


@pytest.mark.parametrize(("t", "ranks", "popularity", "dtype"), ROWS_CASES,
                         ids=[f"T{c[0]}-n{len(c[1])}-{c[2]}-{str(c[3])[6:]}" for c in ROWS_CASES])
def test_multi_lora_rows(dev: str, t: int, ranks: list[int], popularity: str, dtype: torch.dtype, matches,
                         pool_factory, ids_factory) -> None:
    pool = pool_factory(ranks, 33, 65, dtype, dev, seed=t)
    g = torch.Generator().manual_seed(t)
    x = _rand(g, t, 33, dtype=dtype, device=dev)
    y = _rand(g, t, 65, dtype=dtype, device=dev)
    ids = ids_factory(t, len(ranks), popularity, seed=t).to(dev)
    out = pool.rows(x, y, ids)
    ref = R.multi_lora_rows_ref(x, y, pool.A, pool.B, pool.scales, ids)
    matches(out, ref, dtype)
    base = ids.cpu() < 0
    assert torch.equal(out.cpu()[base], y.cpu()[base])  # base-only rows untouched, bit for bit
    if (~base).any():
        assert (out.float() - y.float()).cpu()[~base].abs().max() > 0.05


def test_multi_lora_rows_all_base_and_leading_dims(dev: str, pool_factory, matches) -> None:
    pool = pool_factory([4, 2], 33, 17, torch.float32, dev)
    g = torch.Generator().manual_seed(5)
    x = _rand(g, 3, 4, 33, dtype=torch.float32, device=dev)
    y = _rand(g, 3, 4, 17, dtype=torch.float32, device=dev)
    assert torch.equal(pool.rows(x, y, torch.full((3,), -1, device=dev)), y)
    ids = torch.tensor([1, -1, 0], device=dev)  # one id per sequence of 4 tokens
    out = pool.rows(x, y, ids)
    ref = R.multi_lora_rows_ref(x.reshape(12, 33), y.reshape(12, 17), pool.A, pool.B, pool.scales,
                                ids.cpu().repeat_interleave(4))
    matches(out, ref.reshape(3, 4, 17), torch.float32)


SEG_CASES = [  # (seg_starts, seg_ids, rows, dtype): gaps, empty segments, -1, repeated adapters
    ([0, 5, 5, 12, 20], [2, 0, -1, 1], 20, torch.float32),
    ([3, 9, 30, 31], [1, 1, 0], 34, torch.float16),
    ([0, 17, 40], [0, 2], 40, torch.bfloat16),
]


@pytest.mark.parametrize(("starts", "seg_ids", "t", "dtype"), SEG_CASES, ids=["gaps-empty", "repeat", "two"])
def test_multi_lora_segments(dev: str, starts: list[int], seg_ids: list[int], t: int, dtype: torch.dtype,
                             pool_factory, matches) -> None:
    pool = pool_factory([16, 3, 64], 65, 33, dtype, dev, seed=len(starts))
    g = torch.Generator().manual_seed(t)
    x = _rand(g, t, 65, dtype=dtype, device=dev)
    y = _rand(g, t, 33, dtype=dtype, device=dev)
    ss, si = torch.tensor(starts, device=dev), torch.tensor(seg_ids, device=dev)
    out = pool.segments(x, y, ss, si)
    matches(out, R.multi_lora_segments_ref(x, y, pool.A, pool.B, pool.scales, ss, si), dtype)
    assert torch.equal(out[: starts[0]], y[: starts[0]]) and torch.equal(out[starts[-1]:], y[starts[-1]:])


def test_segments_many_segments_torch_grouped_path(torch_backend: str, pool_factory, matches) -> None:
    """More than 64 segments take the grouped (per-row id) torch path."""
    pool = pool_factory([2, 5, 7], 33, 17, torch.float32, "cpu")
    bounds = torch.arange(0, 141, 2)  # 70 segments of 2 rows
    seg_ids = torch.arange(70) % 4 - 1
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(140, 33, generator=g), torch.randn(140, 17, generator=g)
    matches(pool.segments(x, y, bounds, seg_ids),
            R.multi_lora_segments_ref(x, y, pool.A, pool.B, pool.scales, bounds, seg_ids), torch.float32)


def _sparse(g: torch.Generator, shape: tuple[int, int], density: float, device: str):
    n = shape[0] * shape[1]
    keep = torch.rand(n, generator=g) < density
    keep[: shape[1]] = False  # row 0 empty
    keep[-shape[1]:] = True  # last row dense
    idx = keep.nonzero().flatten()
    return idx.to(device), torch.randn(idx.shape[0], generator=g).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "shape", "density"), [(3, (33, 65), 0.1), (17, (65, 33), 0.5)])
def test_sparse_apply(dev: str, dtype: torch.dtype, m: int, shape: tuple[int, int], density: float,
                      matches) -> None:
    g = torch.Generator().manual_seed(m)
    idx, vals = _sparse(g, shape, density, dev)
    x = _rand(g, m, shape[1], dtype=dtype, device=dev)
    y = _rand(g, m, shape[0], dtype=dtype, device=dev)
    out = K.sparse_apply(x, y, idx, vals, shape)
    matches(out, R.sparse_apply_ref(x, y, idx, vals, shape), dtype)
    assert torch.equal(out[:, 0], y[:, 0])  # empty row of S
    csr = K.to_csr(idx, vals, shape)
    assert torch.equal(K.sparse_apply(x, y, idx, vals, shape, csr=csr), out)


def test_sparse_apply_empty_delta(dev: str) -> None:
    x, y = torch.randn(4, 33, device=dev), torch.randn(4, 17, device=dev)
    empty = torch.zeros(0, dtype=torch.int64, device=dev)
    assert torch.equal(K.sparse_apply(x, y, empty, torch.zeros(0, device=dev), (17, 33)), y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_merge_(dev: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    w = _rand(g, 33, 65, dtype=dtype, device=dev)
    idx, vals = _sparse(g, (33, 65), 0.2, dev)
    ref = R.sparse_merge_ref(w, idx, vals, 0.5)
    target = w.clone()
    assert K.sparse_merge_(target, idx, vals, 0.5) is target
    # fp32 sum, one rounding: the same up to one unit in the last place of the dtype
    ulp = torch.finfo(dtype).eps * ref.float().abs().clamp(min=1e-3)
    assert bool(((target.float() - ref.float()).abs() <= ulp + 1e-7).all())
    untouched = torch.ones(33 * 65, dtype=torch.bool)
    untouched[idx.cpu()] = False
    assert torch.equal(target.flatten()[untouched.to(dev)], w.flatten()[untouched.to(dev)])
    assert not torch.equal(target, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "n_in", "n_out", "per_row"), [(1, 33, 65, True), (18, 65, 33, False)])
def test_ternary_apply(dev: str, dtype: torch.dtype, m: int, n_in: int, n_out: int, per_row: bool,
                       matches) -> None:
    g = torch.Generator().manual_seed(m + n_in)
    signs = torch.randint(-1, 2, (n_out, n_in), generator=g)
    pos, neg = (p.to(dev) for p in K.pack_ternary_planes(signs * 0.3))
    scale = (torch.rand(n_out, generator=g) + 0.1).to(dev) if per_row else 0.3
    x = _rand(g, m, n_in, dtype=dtype, device=dev)
    y = _rand(g, m, n_out, dtype=dtype, device=dev)
    out = K.ternary_apply(x, y, pos, neg, scale, n_in)
    s_ref = scale if per_row else torch.full((n_out,), 0.3, device=dev)
    ref = R.ternary_apply_ref(x, y, pos, neg, s_ref, n_in)
    matches(out, ref, dtype)
    assert (out.float() - y.float()).abs().max() > 0.05


BLOCK_CASES = [  # (rows of x, out, in, n picked, axis): odd sizes, first / last index, a wide block
    (3, 33, 65, 5, "rows"), (17, 65, 33, 40, "rows"), (5, 33, 65, 9, "columns"), (20, 17, 130, 70, "columns")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "n_out", "n_in", "n", "axis"), BLOCK_CASES,
                         ids=[f"{c[4]}-{c[0]}x{c[2]}-n{c[3]}" for c in BLOCK_CASES])
def test_block_apply(dev: str, dtype: torch.dtype, m: int, n_out: int, n_in: int, n: int, axis: str,
                     matches) -> None:
    g = torch.Generator().manual_seed(m + n)
    width = n_out if axis == "rows" else n_in
    idx = torch.randperm(width, generator=g)[:n].sort().values
    idx[0], idx[-1] = 0, width - 1  # both ends of the axis
    idx = idx.to(dev)
    block = _rand(g, *((n, n_in) if axis == "rows" else (n_out, n)), dtype=dtype, device=dev, scale=0.3)
    x = _rand(g, m, n_in, dtype=dtype, device=dev)
    y = _rand(g, m, n_out, dtype=dtype, device=dev)
    out = K.block_apply(x, y, idx, block, 1.5, axis)
    matches(out, R.block_apply_ref(x, y, idx, block, 1.5, axis), dtype)
    assert (out.float() - y.float()).abs().max() > 0.05
    if axis == "rows":  # outputs outside the block's rows are y, bit for bit
        keep = torch.ones(n_out, dtype=torch.bool, device=dev)
        keep[idx] = False
        assert torch.equal(out[:, keep], y[:, keep])


@pytest.mark.parametrize("axis", ["rows", "columns"])
def test_block_apply_leading_dims_and_empty(dev: str, axis: str, matches) -> None:
    g = torch.Generator().manual_seed(6)
    x, y = _rand(g, 2, 3, 33, dtype=torch.float32, device=dev), _rand(g, 2, 3, 17, dtype=torch.float32, device=dev)
    idx = torch.tensor([1, 4, 16], device=dev)
    block = _rand(g, *((3, 33) if axis == "rows" else (17, 3)), dtype=torch.float32, device=dev)
    out = K.block_apply(x, y, idx, block, 0.5, axis)
    assert out.shape == (2, 3, 17)
    matches(out, R.block_apply_ref(x, y, idx, block, 0.5, axis), torch.float32)
    none = torch.zeros(0, dtype=torch.int64, device=dev)
    empty = torch.zeros((0, 33) if axis == "rows" else (17, 0), device=dev)
    assert torch.equal(K.block_apply(x, y, none, empty, 0.5, axis), y)
