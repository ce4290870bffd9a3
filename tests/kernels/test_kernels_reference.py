"""The references and layouts themselves: bit-plane layout, CSR, pool padding, reference math."""

from __future__ import annotations

import pytest
import torch

from adapterfmt.kernels import LoraPool, pack_ternary_planes, to_csr, unpack_ternary_planes
from adapterfmt.kernels import reference as R


@pytest.mark.parametrize("n_in", [1, 8, 33, 65])
def test_ternary_planes_layout_is_little_endian_bits(n_in: int) -> None:
    g = torch.Generator().manual_seed(n_in)
    s = 0.25
    t = torch.randint(-1, 2, (5, n_in), generator=g).float() * s
    pos, neg = pack_ternary_planes(t)
    assert pos.dtype == neg.dtype == torch.uint8 and pos.shape == (5, (n_in + 7) // 8)
    for o in range(5):
        for i in range(n_in):
            assert (int(pos[o, i // 8]) >> (i % 8)) & 1 == int(t[o, i] > 0)
            assert (int(neg[o, i // 8]) >> (i % 8)) & 1 == int(t[o, i] < 0)
    # padding bits past in_features are zero
    if n_in % 8:
        pad_mask = 0xFF & ~((1 << (n_in % 8)) - 1)
        assert int((pos[:, -1] & pad_mask).sum()) == 0 and int((neg[:, -1] & pad_mask).sum()) == 0
    signs = unpack_ternary_planes(pos, neg, n_in)
    assert signs.dtype == torch.int8 and torch.equal(signs, torch.sign(t).to(torch.int8))


def test_ternary_planes_known_bytes_and_bad_shapes() -> None:
    t = torch.tensor([[1, 0, -1, 0, 0, 0, 0, 0, 1]])
    pos, neg = pack_ternary_planes(t)
    assert pos.tolist() == [[0b00000001, 0b1]] and neg.tolist() == [[0b00000100, 0]]
    with pytest.raises(ValueError):
        unpack_ternary_planes(pos, neg, 17)
    with pytest.raises(ValueError):
        pack_ternary_planes(torch.ones(3))


def test_to_csr_matches_torch_and_handles_empty_rows() -> None:
    shape = (7, 11)
    dense = torch.zeros(shape)
    dense[0, 3], dense[0, 10], dense[4, 0], dense[6, 5] = 1.0, 2.0, 3.0, 4.0  # rows 1-3 and 5 empty
    idx = dense.flatten().nonzero().flatten()
    csr = to_csr(idx, dense.flatten()[idx], shape)
    ref = dense.to_sparse_csr()
    assert torch.equal(csr.rowptr, ref.crow_indices()) and torch.equal(csr.cols, ref.col_indices())
    assert torch.equal(csr.values, ref.values())
    assert torch.equal(R.sparse_dense_ref(idx, dense.flatten()[idx], shape), dense)


def test_lora_pool_pads_ranks_with_zeros() -> None:
    g = torch.Generator().manual_seed(0)
    ad = [(torch.randn(r, 6, generator=g), torch.randn(4, r, generator=g), s) for r, s in [(1, 2.0), (3, 0.5)]]
    pool = LoraPool.stack(ad)
    assert pool.A.shape == (2, 3, 6) and pool.B.shape == (2, 4, 3) and pool.ranks == (1, 3) and len(pool) == 2
    assert torch.equal(pool.A[0, 1:], torch.zeros(2, 6)) and torch.equal(pool.B[0, :, 1:], torch.zeros(4, 2))
    assert torch.equal(pool.A[1], ad[1][0]) and pool.scales.dtype == torch.float32
    assert pool.scales.tolist() == [2.0, 0.5]
    with pytest.raises(ValueError):
        LoraPool.stack([(torch.randn(2, 6), torch.randn(4, 3), 1.0)])
    with pytest.raises(ValueError):
        LoraPool.stack([])


def test_references_agree_with_each_other_and_nn_linear() -> None:
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(9, 5)
    A, B = torch.randn(2, 9, generator=g), torch.randn(5, 2, generator=g)
    x = torch.randn(4, 9, generator=g)
    with torch.no_grad():
        expect = lin(x) + 0.7 * (x @ (B @ A).t())
        assert torch.allclose(R.lora_linear_ref(x, lin.weight, A, B, 0.7, lin.bias), expect, atol=1e-5)
        y = lin(x)
        assert torch.allclose(R.lora_delta_ref(x, A, B, 0.7, y), expect, atol=1e-5)
    pool = LoraPool.stack([(A, B, 0.7), (A * 2, B, 0.1)])
    ids = torch.tensor([1, -1, 0, 1])
    rows = R.multi_lora_rows_ref(x, y, pool.A, pool.B, pool.scales, ids)
    segs = R.multi_lora_segments_ref(x, y, pool.A, pool.B, pool.scales, torch.tensor([0, 1, 2, 3, 4]), ids)
    assert torch.equal(rows, segs) and torch.equal(rows[1], y[1])
    assert torch.allclose(rows[2], expect[2], atol=1e-5)
    assert torch.allclose(rows[0], R.lora_delta_ref(x[:1], A * 2, B, 0.1, y[:1])[0], atol=1e-5)
    # ternary and sparse references are the same delta written two ways
    signs = torch.randint(-1, 2, (5, 9), generator=g)
    pos, neg = pack_ternary_planes(signs)
    sc = torch.rand(5, generator=g)
    dense = signs.float() * sc[:, None]
    idx = dense.flatten().nonzero().flatten()
    assert torch.allclose(R.ternary_apply_ref(x, y, pos, neg, sc, 9),
                          R.sparse_apply_ref(x, y, idx, dense.flatten()[idx], (5, 9)), atol=1e-6)
    assert torch.allclose(R.sparse_merge_ref(lin.weight.detach(), idx, dense.flatten()[idx], 2.0),
                          lin.weight.detach() + 2 * dense)
