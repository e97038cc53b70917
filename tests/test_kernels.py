import pytest
import torch

from submerge.methods import kernels


def _reference_window(values: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    order = torch.sort(values.reshape(-1), stable=True).indices
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order[lo:hi]] = True
    return mask.reshape(values.shape)


@pytest.mark.parametrize("lo,hi", [(0, 1), (0, 50), (10, 90), (99, 100), (0, 100), (30, 30)])
def test_rank_window_matches_a_stable_sort_even_with_ties(lo, hi):
    torch.manual_seed(0)
    values = torch.randint(0, 7, (10, 10)).float()  # heavy ties
    got = kernels.rank_window_mask(values, lo, hi)
    assert got.sum().item() == max(0, hi - lo)
    assert torch.equal(got, _reference_window(values, lo, hi))


def test_magnitude_mask_keeps_exactly_k_largest():
    torch.manual_seed(1)
    x = torch.randn(37, 11)
    for density in (0.01, 0.2, 0.5, 0.99):
        m = kernels.magnitude_mask(x, density)
        k = max(1, int(density * x.numel()))
        assert m.sum().item() == k
        assert x.abs()[m].min() >= x.abs()[~m].max()
    assert kernels.magnitude_mask(x, 1.0).all()
    assert not kernels.magnitude_mask(x, 0.0).any()


def test_outlier_mask_drops_top_gamma_and_small_tail():
    x = torch.arange(1, 101, dtype=torch.float32)  # |x| = 1..100
    m = kernels.outlier_mask(x, density=0.5, gamma=0.1)
    # keep 50 entries, drop the 10 largest: ranks 40..89 -> values 41..90
    assert torch.equal(x[m], torch.arange(41, 91, dtype=torch.float32))
    # outlier removal shrinks when the density needs the room
    m = kernels.outlier_mask(x, density=0.95, gamma=0.1)
    assert torch.equal(x[m], torch.arange(1, 96, dtype=torch.float32))


def test_della_keep_probs_rise_linearly_with_rank():
    x = torch.tensor([[0.1, -3.0, 2.0, 0.5, -1.0]])
    p = kernels.della_keep_probs(x, density=0.5, epsilon=0.2)
    # ranks by |x|: 0.1->0, 0.5->1, 1.0->2, 2.0->3, 3.0->4 ; p = 0.3 + rank/4 * 0.4
    expect = torch.tensor([[0.3, 0.7, 0.6, 0.4, 0.5]])
    assert torch.allclose(p, expect)


def test_rescale_masked_norms_and_density():
    x = torch.tensor([1.0, -2.0, 3.0, -4.0])
    mask = torch.tensor([True, False, True, False])
    out = kernels.rescale_masked(x.clone(), mask, "l1")
    assert torch.allclose(out, torch.tensor([1.0, 0, 3.0, 0]) * 10 / 4)
    out = kernels.rescale_masked(x.clone(), mask, "density", keep_prob=0.5)
    assert torch.equal(out, torch.tensor([2.0, 0, 6.0, 0]))
    out = kernels.rescale_masked(x.clone(), mask, None)
    assert torch.equal(out, torch.tensor([1.0, 0, 3.0, 0]))


def test_sign_election_and_disjoint_mean_by_hand():
    deltas = torch.tensor([[1.0, -2.0, 0.5], [-3.0, -1.0, 0.5], [1.0, 4.0, -2.0]])
    sign = kernels.elect_sign(deltas, "sum")  # sums: -1, 1, -1
    assert torch.equal(sign, torch.tensor([-1.0, 1.0, -1.0]))
    merged = kernels.disjoint_merge(deltas.clone(), torch.ones(3), sign, normalize=True)
    assert torch.allclose(merged, torch.tensor([-3.0, 4.0, -2.0]))
    sign_count = kernels.elect_sign(deltas, "count")  # votes: +1, -1, +1
    assert torch.equal(sign_count, torch.tensor([1.0, -1.0, 1.0]))


def test_streaming_kth_is_exact_over_chunks():
    torch.manual_seed(3)
    chunks = [torch.randn(1000) * s for s in (1e-4, 1.0, 30.0)] + [torch.zeros(50)]
    flat = torch.cat(chunks).abs()
    for rank in (1, 51, 1500, flat.numel()):
        sel = kernels.StreamingKth(rank)
        for c in chunks:
            sel.add_pass1(c)
        for c in chunks:
            sel.add_pass2(c)
        assert sel.value() == torch.kthvalue(flat, rank).values.item()


def test_release_drops_scratch_and_workers_and_the_pool_comes_back():
    import numpy as np

    from submerge.methods import kernels, workspace

    big = [torch.randn(1 << 18) for _ in range(3)]
    got = workspace.parallel_map(lambda x: kernels.magnitude_threshold(x, 0.1), big, sizes=[x.numel() for x in big],
                               min_size=1)
    assert [r.v for r in got] == [kernels.magnitude_threshold(x, 0.1).v for x in big]
    workspace.release()
    assert workspace._POOL is None and all(h.buf is None for h in workspace._SCRATCHES)
    again = workspace.parallel_map(lambda x: float(np.abs(x.numpy()).max()), big, sizes=[x.numel() for x in big],
                                 min_size=1)
    assert again == [float(x.abs().max()) for x in big]
    workspace.release()
