"""Token-wise matching of every pair in a batch: the similarity S of MTM, with a fast backward.

S[a, b] = exp(logit_scale) * (t2v[a, b] + v2t[a, b]) / 2, where, with e[i, j] = q_a[i] . k_b[j],
t2v = (1/N) sum_i max_j e[i, j] and v2t = (1/M) sum_j max_i e[i, j] (MODEL.md, section 2).

The gradient of a max flows only to its argmax, so the backward rebuilds dq and dk from the saved
indices, as weighted sums of 2*B*B*N rows, instead of the dense (B, B, N, M) score tensor that plain
autograd keeps and multiplies. ``mean_max_similarity_dense`` is the plain formula in autograd ops:
the straightforward variant of research/benchmark.py and the oracle of tests/test_mtm.py.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.distributed import gather_batch


@torch.library.custom_op("scorer::mean_max_similarity", mutates_args=())
def mean_max_similarity(q: torch.Tensor, k: torch.Tensor,
                        chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t2v + v2t) / 2 of every (query, key) pair of the batch, with the argmax-only backward.

    q: (A, N, D), k: (B, M, D) -> (similarity (A, B), t2v argmax (A, B, N), v2t argmax (A, B, M)).
    A torch custom op, so that selective recomputation (models/captioner.py) can keep its result instead
    of running it again; its backward needs only the argmax indices it returns.
    """
    A, N, D = q.shape
    B, M = k.shape[:2]
    dtype = torch.promote_types(q.dtype, k.dtype)  # out= below is not autocast: one dtype by hand
    q, k = q.to(dtype), k.to(dtype)
    keys = k.reshape(B * M, D).t()  # (D, B*M)
    # One score buffer for every chunk: a fresh tensor of this size per chunk costs page faults.
    buffer = q.new_empty(min(chunk, A) * N, B * M)
    sims, t2v_idx, v2t_idx = [], [], []
    for start in range(0, A, chunk):
        rows = q[start:start + chunk].reshape(-1, D)  # (c*N, D)
        c = rows.size(0) // N
        scores = torch.mm(rows, keys, out=buffer[:c * N]).view(c, N, B, M).transpose(1, 2)  # (c, B, N, M)
        t2v, t2v_arg = scores.max(dim=-1)  # (c, B, N)
        v2t, v2t_arg = scores.max(dim=-2)  # (c, B, M)
        sims.append((t2v.mean(dim=-1) + v2t.mean(dim=-1)) / 2)  # (c, B)
        t2v_idx.append(t2v_arg)
        v2t_idx.append(v2t_arg)
    return torch.cat(sims), torch.cat(t2v_idx), torch.cat(v2t_idx)


@mean_max_similarity.register_fake
def _output_shapes(q, k, chunk):
    """The outputs' shapes and dtypes, without computing them (for torch.compile's tracing)."""
    A, N = q.shape[:2]
    B, M = k.shape[:2]
    dtype = torch.promote_types(q.dtype, k.dtype)
    return (q.new_empty(A, B, dtype=dtype), q.new_empty(A, B, N, dtype=torch.long),
            q.new_empty(A, B, M, dtype=torch.long))


def _save_for_backward(ctx, inputs, output):
    q, k, _ = inputs
    _, t2v_idx, v2t_idx = output
    ctx.save_for_backward(q, k, t2v_idx, v2t_idx)


def _backward(ctx, grad, _t2v_grad, _v2t_grad):
    q, k, t2v_idx, v2t_idx = ctx.saved_tensors
    A, N, D = q.shape
    B, M = k.shape[:2]
    device = q.device
    a = torch.arange(A, device=device).view(A, 1, 1)
    b = torch.arange(B, device=device).view(1, B, 1)
    i = torch.arange(N, device=device).view(1, 1, N)
    j = torch.arange(M, device=device).view(1, 1, M)
    # Sums of many rows: not in half precision.
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
    grad = grad.to(dtype)
    # One entry per max taken: e[a, b, i, j] with query row (a, i), key row (b, j) and weight
    # d S[a, b] / d e[a, b, i, j]; dq[a, i] sums weight * k[b, j] over its entries, dk likewise.
    q_rows = torch.cat([(a * N + i).expand(A, B, N).reshape(-1), (a * N + v2t_idx).reshape(-1)])
    k_rows = torch.cat([(b * M + t2v_idx).reshape(-1), (b * M + j).expand(A, B, M).reshape(-1)])
    weights = torch.cat([(grad / (2 * N)).unsqueeze(-1).expand(A, B, N).reshape(-1),
                         (grad / (2 * M)).unsqueeze(-1).expand(A, B, M).reshape(-1)])
    grad_q = _weighted_row_sums(q_rows, k_rows, weights, k.reshape(B * M, D).to(dtype), A * N)
    grad_k = _weighted_row_sums(k_rows, q_rows, weights, q.reshape(A * N, D).to(dtype), B * M)
    return grad_q.view(A, N, D).to(q.dtype), grad_k.view(B, M, D).to(k.dtype), None


mean_max_similarity.register_autograd(_backward, setup_context=_save_for_backward)


def _weighted_row_sums(targets, sources, weights, table, num_rows):
    """out[r] = sum of weights[e] * table[sources[e]] over the entries e with targets[e] == r.

    The entries are sorted by target so that each output row is one bag of embedding_bag, which sums
    the rows in place (a sparse COO product of the same entries took about twice as long).
    """
    order = torch.argsort(targets, stable=True)
    counts = torch.bincount(targets, minlength=num_rows)
    return F.embedding_bag(sources[order], table, counts.cumsum(0) - counts, mode="sum",
                           per_sample_weights=weights[order])  # (num_rows, D)


def mean_max_similarity_dense(q, k, chunk):
    """The same (A, B) similarity in plain autograd ops (the straightforward formulation)."""
    sims = []
    for start in range(0, q.size(0), chunk):
        scores = torch.einsum("aid,bjd->abij", q[start:start + chunk], k)  # (c, B, N, M)
        sims.append((scores.max(dim=-1).values.mean(dim=-1) + scores.max(dim=-2).values.mean(dim=-1)) / 2)
    return torch.cat(sims)  # (A, B)


def token_wise_similarity(q, k, logit_scale, heads=1, chunk=16, sparse_backward=True):
    """S (B, B) of the batch: exp(logit_scale) * (t2v + v2t) / 2 for every pair.

    q, k: (B, N, d) projected queries and keys. With heads == 1 the dot product runs over the full
    d (the reference's MTM); with heads > 1 it is the mean over heads of per-head TMs. Rows of the
    batch are processed ``chunk`` at a time so the (B, B, N, N) score tensor never exists whole.
    sparse_backward picks the argmax-only backward; False keeps plain autograd (same values).
    In multi-process training q and k hold this rank's rows: its queries meet the keys of the global
    batch, and the rows of all ranks are gathered into the global (B, B) matrix (utils/distributed.py).
    """
    k = gather_batch(k)  # (B, M, d) of the global batch
    B, N, d = q.shape
    qh = q.view(B, N, heads, d // heads).transpose(1, 2)  # (b, h, N, dh)
    kh = k.view(k.size(0), k.size(1), heads, d // heads).transpose(1, 2)  # (B, h, M, dh)
    if sparse_backward:  # the custom op also returns the argmax indices its backward keeps
        per_head = [mean_max_similarity(qh[:, h], kh[:, h], chunk)[0] for h in range(heads)]  # h x (b, B)
    else:
        per_head = [mean_max_similarity_dense(qh[:, h], kh[:, h], chunk) for h in range(heads)]  # h x (b, B)
    return gather_batch(logit_scale.exp() * torch.stack(per_head).mean(dim=0))  # (B, B)


class TokenWiseMatching(nn.Module):
    """S = exp(logit_scale) * MTM(Q, K) of every (query, key) pair of the batch, computed as the config says
    (model.change_detector: mtm, the heads; mtm_chunk; mtm_sparse_backward): the blocks that call it name
    the method, this module holds how it is computed. No parameters: the state dict does not change.

    heads: None takes them from the config ("sum": one TM over the full d, the reference's; "per_head": the
    mean of per-head TMs); 1 always matches over the full d (the CBR head's, as in the reference).
    when: "always"; "training" (S enters a training loss, and only in training: returns None in evaluation);
    "never" (no loss uses this block's S: returns None). The model that owns the blocks sets it.
    """

    WHEN = ("always", "training", "never")

    def __init__(self, cfg, heads=None):
        super().__init__()
        enc = cfg.model.change_detector
        self.heads = heads if heads is not None else (enc.att_head if enc.mtm == "per_head" else 1)
        self.chunk = enc.mtm_chunk
        self.sparse_backward = enc.mtm_sparse_backward
        self.when = "always"

    def forward(self, q, k, logit_scale):
        """q, k: (B, N, d) projected queries and keys -> S (B, B), or None when not wanted (see ``when``)."""
        if self.when == "never" or (self.when == "training" and not self.training):
            return None
        return token_wise_similarity(q, k, logit_scale, self.heads, self.chunk, self.sparse_backward)
