"""SCORER encoder: cross-view representation reconstruction with multi-head token-wise matching.

Shapes: B batch, C channels, H x W grid, N = H*W tokens, d = att_dim, h heads, dh = d / h.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class AddSpatialInfo(nn.Module):
    """Appends x and y coordinate channels in [-1, 1) to a feature map: (B, C, H, W) -> (B, C+2, H, W)."""

    def forward(self, img_feat):
        B, _, H, W = img_feat.shape
        cols = torch.arange(W, device=img_feat.device, dtype=img_feat.dtype)
        rows = torch.arange(H, device=img_feat.device, dtype=img_feat.dtype)
        x = (2 * cols / W - 1).view(1, 1, 1, W).expand(B, 1, H, W)
        y = (2 * rows / H - 1).view(1, 1, H, 1).expand(B, 1, H, W)
        return torch.cat([img_feat, x, y], dim=1)


def token_wise_similarity(q, k, logit_scale, heads=1, chunk=16):
    """Token-wise matching of every pair in the batch: S[a, b] = exp(scale) * (t2v + v2t) / 2.

    q, k: (B, N, d) projected queries and keys. With heads == 1 the dot product runs over the full
    d (the reference's MTM); with heads > 1 it is the mean over heads of per-head TMs. Rows of the
    batch are processed ``chunk`` at a time so the (B, B, N, N) score tensor never exists whole;
    max only keeps its indices for backward, so each chunk's scores are freed at once.
    """
    B, N, d = q.shape
    qh = q.view(B, N, heads, d // heads).transpose(1, 2)  # (B, h, N, dh)
    kh = k.view(k.size(0), k.size(1), heads, d // heads).transpose(1, 2)  # (B, h, N, dh)
    rows = []
    for start in range(0, B, chunk):
        scores = torch.einsum("ahid,bhjd->abhij", qh[start:start + chunk], kh)  # (c, B, h, N, N)
        t2v = scores.max(dim=-1).values.mean(dim=-1)  # (c, B, h)
        v2t = scores.max(dim=-2).values.mean(dim=-1)  # (c, B, h)
        rows.append(((t2v + v2t) / 2).mean(dim=-1))  # (c, B)
    return logit_scale.exp() * torch.cat(rows, dim=0)  # (B, B)


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
        self.query = nn.Linear(enc.att_dim, enc.att_dim)
        self.key = nn.Linear(enc.att_dim, enc.att_dim)
        self.value = nn.Linear(enc.att_dim, enc.att_dim)
        self.dropout = nn.Dropout(enc.dropout)
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
            sim = token_wise_similarity(q, k, self.logit_scale, self.mtm_heads, self.mtm_chunk)

        # == To Implement == Attention: multi-head scaled dot-product reconstruction
        # Given the projected q, k, v of shape (B, N, d):
        #   1. split each into self.num_heads heads of size self.head_dim -> (B, h, N, dh)
        #   2. scores = q k^T / sqrt(dh) -> (B, h, N, N); probs = softmax over the last dim
        #   3. keep the head-averaged probs (B, N, N) in `attention_map` (before dropout)
        #   4. apply self.dropout to probs, context = probs v, merge heads back -> (B, N, d)
        # The result goes in `context`; the residual link and LayerNorm follow below.
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

        output = self.layer_norm(context + query_states)
        return output, sim, attention_map


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
            nn.Linear(2 * enc.att_dim, enc.emb_dim), nn.Dropout(enc.dropout), nn.ReLU())

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
