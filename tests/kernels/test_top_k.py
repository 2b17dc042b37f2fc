"""top_k_rows: each row's k largest entries, as torch.topk finds them, ties and NaN handled."""

import pytest
import torch

from falconet.kernels import cpu_kernels, top_k_indices

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="the C++ kernels did not build here")


@pytest.mark.parametrize("rows, n, k", [(1, 49152, 8), (7, 1000, 8), (3, 37, 5), (2, 16, 16), (4, 9, 1)])
def test_matches_torch_topk(rows, n, k):
    g = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, n, generator=g)
    assert torch.equal(kernels.top_k_rows(x, k), torch.topk(x, k, dim=-1).indices)
    # a row that rises to its end inserts at almost every block: the worst case for the scan
    ramp = torch.arange(n, dtype=torch.float32).repeat(rows, 1)
    assert torch.equal(kernels.top_k_rows(ramp, k), torch.topk(ramp, k, dim=-1).indices)


def test_ties_keep_the_lower_index_and_nan_never_enters():
    x = torch.tensor([[1.0, 3.0, 3.0, float("nan"), 2.0, 3.0, -float("inf")]])
    assert kernels.top_k_rows(x, 4).tolist() == [[1, 2, 5, 4]]
    assert kernels.top_k_rows(torch.tensor([[float("nan"), 1.0]]), 2).tolist() == [[1, -1]]


def test_top_k_indices_falls_back_to_torch_where_the_kernel_does_not_apply():
    x = torch.randn(3, 50)
    assert torch.equal(top_k_indices(x, 4), kernels.top_k_rows(x, 4))
    assert torch.equal(top_k_indices(x.double(), 4), torch.topk(x.double(), 4).indices)
    assert torch.equal(top_k_indices(x[0], 4), torch.topk(x[0], 4).indices)
    with pytest.raises(RuntimeError, match="k must be"):
        kernels.top_k_rows(x, 51)
