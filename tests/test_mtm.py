"""models/mtm.py: the MTM similarity against loops, chunking, and its argmax-only backward against autograd."""
import math

import pytest
import torch

from models.mtm import token_wise_similarity


def test_mtm_one_pair_by_loops_and_chunking():
    torch.manual_seed(4)
    q = torch.randn(5, 4, 6, dtype=torch.float64)
    k = torch.randn(5, 4, 6, dtype=torch.float64)
    scale = torch.tensor(0.7, dtype=torch.float64)
    sim = token_wise_similarity(q, k, scale, heads=1, chunk=2)
    a, b = 3, 1
    e = [[sum(q[a, i, c].item() * k[b, j, c].item() for c in range(6)) for j in range(4)] for i in range(4)]
    t2v = sum(max(row) for row in e) / 4
    v2t = sum(max(e[i][j] for i in range(4)) for j in range(4)) / 4
    assert sim[a, b].item() == pytest.approx(math.exp(0.7) * (t2v + v2t) / 2, rel=1e-10)
    for chunk in (1, 3, 5, 16):
        assert torch.allclose(token_wise_similarity(q, k, scale, 1, chunk), sim, atol=1e-12)

    # Per-head variant: the mean over heads of each head's TM.
    per_head = token_wise_similarity(q, k, scale, heads=2, chunk=2)
    heads = [token_wise_similarity(q[..., h * 3:(h + 1) * 3], k[..., h * 3:(h + 1) * 3], scale, 1, 5)
             for h in range(2)]
    assert torch.allclose(per_head, (heads[0] + heads[1]) / 2, atol=1e-12)


@pytest.mark.parametrize("heads", [1, 2])
def test_argmax_backward_equals_autograd(heads):
    torch.manual_seed(11)
    q = torch.randn(5, 6, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 4, 8, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, 5, dtype=torch.float64)
    grads = []
    for sparse in (True, False):
        sim = token_wise_similarity(q, k, scale, heads=heads, chunk=2, sparse_backward=sparse)
        grads.append((sim, *torch.autograd.grad((sim * weights).sum(), (q, k, scale))))
    for fast, plain in zip(*grads):
        assert torch.allclose(fast, plain, atol=1e-12)
    small_q, small_k = q[:3, :3, :4].detach().requires_grad_(), k[:3, :2, :4].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: token_wise_similarity(a, b, scale.detach(), heads, 2),
                                    (small_q, small_k))
