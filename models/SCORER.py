"""SCORER encoder: cross-view representation reconstruction with multi-head token-wise matching.

Shapes: B batch, C channels, H x W grid, N = H*W tokens, d = att_dim, h heads, dh = d / h.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from utils.distributed import gather_batch
from utils.utils import Dropout


class AddSpatialInfo(nn.Module):
    """Appends x and y coordinate channels in [-1, 1) to a feature map: (B, C, H, W) -> (B, C+2, H, W)."""

    def forward(self, img_feat):
        B, _, H, W = img_feat.shape
        cols = torch.arange(W, device=img_feat.device, dtype=img_feat.dtype)
        rows = torch.arange(H, device=img_feat.device, dtype=img_feat.dtype)
        x = (2 * cols / W - 1).view(1, 1, 1, W).expand(B, 1, H, W)
        y = (2 * rows / H - 1).view(1, 1, H, 1).expand(B, 1, H, W)
        return torch.cat([img_feat, x, y], dim=1)


class _MeanMaxSimilarity(torch.autograd.Function):
    """Token-wise matching of every pair in a batch, (B, B), with a backward that needs no scores.

    The gradient of a max flows only to its argmax, so backward rebuilds dq and dk from the
    saved indices, as weighted sums of 2*B*B*N rows, instead of the dense (B, B, N, M) score
    tensor that plain autograd would keep and multiply.
    """

    @staticmethod
    def forward(ctx, q, k, chunk):
        """q: (A, N, D), k: (B, M, D) -> (A, B) = (mean_i max_j e + mean_j max_i e) / 2."""
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
        ctx.save_for_backward(q, k, torch.cat(t2v_idx), torch.cat(v2t_idx))
        return torch.cat(sims)

    @staticmethod
    def backward(ctx, grad):
        q, k, t2v_idx, v2t_idx = ctx.saved_tensors
        A, N, D = q.shape
        B, M = k.shape[:2]
        device = q.device
        a = torch.arange(A, device=device).view(A, 1, 1)
        b = torch.arange(B, device=device).view(1, B, 1)
        i = torch.arange(N, device=device).view(1, 1, N)
        j = torch.arange(M, device=device).view(1, 1, M)
        dtype = torch.promote_types(q.dtype, torch.float32)  # sums of many rows: not in half precision
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


def _weighted_row_sums(targets, sources, weights, table, num_rows):
    """out[r] = sum of weights[e] * table[sources[e]] over the entries e with targets[e] == r.

    The entries are sorted by target so that each output row is one bag of embedding_bag, which sums
    the rows in place (a sparse COO product of the same entries took about twice as long).
    """
    order = torch.argsort(targets, stable=True)
    counts = torch.bincount(targets, minlength=num_rows)
    return F.embedding_bag(sources[order], table, counts.cumsum(0) - counts, mode="sum",
                           per_sample_weights=weights[order])  # (num_rows, D)


def _mean_max_similarity_dense(q, k, chunk):
    """The same similarity in plain autograd ops (the straightforward formulation)."""
    sims = []
    for start in range(0, q.size(0), chunk):
        scores = torch.einsum("aid,bjd->abij", q[start:start + chunk], k)  # (c, B, N, M)
        sims.append((scores.max(dim=-1).values.mean(dim=-1) + scores.max(dim=-2).values.mean(dim=-1)) / 2)
    return torch.cat(sims)  # (B, B)


def token_wise_similarity(q, k, logit_scale, heads=1, chunk=16, sparse_backward=True):
    """Token-wise matching of every pair in the batch: S[a, b] = exp(scale) * (t2v + v2t) / 2.

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
    similarity = _MeanMaxSimilarity.apply if sparse_backward else _mean_max_similarity_dense
    per_head = [similarity(qh[:, h], kh[:, h], chunk) for h in range(heads)]  # h x (b, B)
    return gather_batch(logit_scale.exp() * torch.stack(per_head).mean(dim=0))  # (B, B)


class Attention(nn.Module):
    """Multi-head cross-attention that reconstructs one view from the other, plus the MTM similarity."""

    def __init__(self, cfg):
        super().__init__()
        enc = cfg.model.change_detector
        if enc.att_dim % enc.att_head:
            raise ValueError(f"model.change_detector.att_dim ({enc.att_dim}) must be divisible by "
                             f"model.change_detector.att_head ({enc.att_head})")
        self.num_heads = enc.att_head
        self.head_dim = enc.att_dim // enc.att_head
        self.mtm_heads = enc.att_head if enc.mtm == "per_head" else 1
        self.mtm_chunk = enc.mtm_chunk
        self.sparse_backward = enc.mtm_sparse_backward
        self.recompute = cfg.train.recompute_attention
        self.query = nn.Linear(enc.att_dim, enc.att_dim)
        self.key = nn.Linear(enc.att_dim, enc.att_dim)
        self.value = nn.Linear(enc.att_dim, enc.att_dim)
        self.dropout = Dropout(enc.dropout)
        self.layer_norm = nn.LayerNorm(enc.att_dim, eps=1e-6)
        # exp(logit_scale) is the inverse temperature 1/tau of the InfoNCE loss.
        self.logit_scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, query_states, key_states, value_states, compute_similarity=True):
        """query/key/value_states: (B, N, d). Returns (output (B, N, d), S (B, B) or None, A (B, N, N))."""
        q = self.query(query_states)  # (B, N, d)
        k = self.key(key_states)  # (B, N, d)
        v = self.value(value_states)  # (B, N, d)
        # Only the last block's S enters the loss; the caller asks for it there alone.
        sim = None
        if compute_similarity:
            sim = token_wise_similarity(q, k, self.logit_scale, self.mtm_heads, self.mtm_chunk,
                                        self.sparse_backward)
        if self.recompute and torch.is_grad_enabled():
            # The (B, h, N, N) probabilities and the LayerNorm's input are rebuilt in backward, with
            # the same dropout mask.
            output, attention_map = checkpoint(self.reconstruct_and_norm, q, k, v, query_states, use_reentrant=False)
        else:
            output, attention_map = self.reconstruct_and_norm(q, k, v, query_states)
        return output, sim, attention_map

    def reconstruct_and_norm(self, q, k, v, query_states):
        """The reconstruction with its residual link and LayerNorm: (output (B, N, d), map (B, N, N))."""
        context, attention_map = self.reconstruct(q, k, v)
        return self.layer_norm(context + query_states), attention_map

    def reconstruct(self, q, k, v):
        """Projected q, k, v (B, N, d) -> (context (B, N, d), head-averaged attention map (B, N, N))."""
        # == To Implement == Attention: multi-head scaled dot-product reconstruction
        # Given the projected q, k, v of shape (B, N, d):
        #   1. split each into self.num_heads heads of size self.head_dim -> (B, h, N, dh)
        #   2. scores = q k^T / sqrt(dh) -> (B, h, N, N); probs = softmax over the last dim
        #   3. keep the head-averaged probs (B, N, N) in `attention_map` (before dropout)
        #   4. apply self.dropout to probs, context = probs v, merge heads back -> (B, N, d)
        # The result goes in `context`; forward adds the residual link and the LayerNorm.
        B, N, _ = q.shape
        qh = q.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, dh)
        kh = k.view(B, k.size(1), self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, M, dh)
        vh = v.view(B, v.size(1), self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, M, dh)
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, h, N, M)
        probs = F.softmax(scores, dim=-1)
        attention_map = probs.mean(dim=1)  # (B, N, M)
        context = self.dropout(probs) @ vh  # (B, h, N, dh)
        context = context.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)  # (B, N, d)
        # == End ==
        return context, attention_map


class SCORER(nn.Module):
    """One encoder block; the same weights update both views."""

    def __init__(self, cfg):
        super().__init__()
        self.attention = Attention(cfg)

    def forward(self, query_states, key_states, value_states, compute_similarity=True):
        return self.attention(query_states, key_states, value_states, compute_similarity)


class ChangeDetector(nn.Module):
    """Encodes a (before, after) feature pair into the difference representation (B, N, emb_dim)."""

    def __init__(self, cfg):
        super().__init__()
        enc = cfg.model.change_detector
        if enc.att_dim % 2:
            raise ValueError(f"model.change_detector.att_dim ({enc.att_dim}) must be even: half of it "
                             f"encodes the column, half the row")
        self.grid = enc.grid
        self.img = nn.Sequential(nn.Conv2d(enc.feat_dim, enc.att_dim, kernel_size=1))
        self.w_embedding = nn.Embedding(enc.grid, enc.att_dim // 2)
        self.h_embedding = nn.Embedding(enc.grid, enc.att_dim // 2)
        self.scorer = nn.ModuleList([SCORER(cfg) for _ in range(enc.att_layer)])
        self.embed_fc = nn.Sequential(
            nn.Linear(2 * enc.att_dim, enc.emb_dim), Dropout(enc.dropout), nn.ReLU())

    def position_encoding(self, H, W):
        """Learned position encoding P (d, H, W): P[:, r, c] = concat(w_embedding[c], h_embedding[r])."""
        if H > self.grid or W > self.grid:
            raise ValueError(f"feature grid {H}x{W} is larger than model.change_detector.grid "
                             f"({self.grid}); raise that key to at least {max(H, W)}")
        device = self.w_embedding.weight.device
        cols = self.w_embedding(torch.arange(W, device=device))  # (W, d/2)
        rows = self.h_embedding(torch.arange(H, device=device))  # (H, d/2)
        pos = torch.cat([cols.unsqueeze(0).expand(H, W, -1),
                         rows.unsqueeze(1).expand(H, W, -1)], dim=-1)  # (H, W, d)
        return pos.permute(2, 0, 1)  # (d, H, W)

    def forward(self, x_bef, x_aft, compute_similarity=None, return_attention=False):
        """x_bef, x_aft: (B, feat_dim, H, W).

        Returns (out (B, N, emb_dim), S_ba (B, B), S_ab (B, B), bef_tokens (B, N, d),
        aft_tokens (B, N, d)); the similarities are None unless computed (by default in
        training only). With return_attention, a sixth item holds the last block's
        head-averaged maps (A_ba, A_ab), each (B, N, N).
        """
        if compute_similarity is None:
            compute_similarity = self.training
        H, W = x_bef.shape[-2:]
        pos = self.position_encoding(H, W)
        bef = (self.img(x_bef) + pos).flatten(2).transpose(1, 2)  # (B, N, d)
        aft = (self.img(x_aft) + pos).flatten(2).transpose(1, 2)  # (B, N, d)
        bef_tokens, aft_tokens = bef, aft

        sim_ba = sim_ab = att_ba = att_ab = None
        for index, block in enumerate(self.scorer):
            last = compute_similarity and index == len(self.scorer) - 1
            bef_prev = bef
            bef, sim_ba, att_ba = block(bef, aft, aft, last)
            # The "after" view attends to the "before" tokens from before this block (reference order).
            aft, sim_ab, att_ab = block(aft, bef_prev, bef_prev, last)

        out = self.embed_fc(torch.cat([bef, aft], dim=-1))  # (B, N, emb_dim)
        outputs = (out, sim_ba, sim_ab, bef_tokens, aft_tokens)
        if return_attention:
            outputs = outputs + ((att_ba, att_ab),)
        return outputs
