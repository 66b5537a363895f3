"""SCORER encoder: cross-view representation reconstruction with multi-head token-wise matching.

Shapes: B batch, C channels, H x W grid, N = H*W tokens, d = att_dim, h heads, dh = d / h.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.mtm import TokenWiseMatching


class AddSpatialInfo(nn.Module):
    """Appends x and y coordinate channels in [-1, 1) to a feature map: (B, C, H, W) -> (B, C+2, H, W)."""

    def forward(self, img_feat):
        B, _, H, W = img_feat.shape
        cols = torch.arange(W, device=img_feat.device, dtype=img_feat.dtype)
        rows = torch.arange(H, device=img_feat.device, dtype=img_feat.dtype)
        x = (2 * cols / W - 1).view(1, 1, 1, W).expand(B, 1, H, W)
        y = (2 * rows / H - 1).view(1, 1, H, 1).expand(B, 1, H, W)
        return torch.cat([img_feat, x, y], dim=1)


class Attention(nn.Module):
    """Multi-head cross-attention that reconstructs one view from the other (MHCA), plus the MTM similarity."""

    def __init__(self, cfg):
        super().__init__()
        enc = cfg.model.change_detector
        if enc.att_dim % enc.att_head:
            raise ValueError(f"model.change_detector.att_dim ({enc.att_dim}) must be divisible by "
                             f"model.change_detector.att_head ({enc.att_head})")
        self.num_attention_heads = enc.att_head
        self.attention_head_size = enc.att_dim // enc.att_head
        self.mtm = TokenWiseMatching(cfg)  # multi-head token-wise matching (models/mtm.py)
        self.query = nn.Linear(enc.att_dim, enc.att_dim)
        self.key = nn.Linear(enc.att_dim, enc.att_dim)
        self.value = nn.Linear(enc.att_dim, enc.att_dim)
        self.dropout = nn.Dropout(enc.dropout)
        self.layer_norm = nn.LayerNorm(enc.att_dim, eps=1e-6)
        # exp(logit_scale) is the inverse temperature 1/tau of the InfoNCE loss.
        self.logit_scale = nn.Parameter(torch.tensor(1.0))

    def split_heads(self, x):
        B, N, _ = x.shape
        return x.view(B, N, self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # (B, h, N, dh)

    def forward(self, query_states, key_states, value_states):
        """query/key/value_states: (B, N, d). Returns (output (B, N, d), S (B, B) or None, A (B, N, N))."""
        q = self.query(query_states)  # (B, N, d)
        k = self.key(key_states)  # (B, N, d)
        v = self.value(value_states)  # (B, N, d)
        # S = exp(logit_scale) * MTM(Q, K) of every pair in the batch, where a loss uses it (else None).
        # Quirk kept from the reference: one dot product over all heads (model.change_detector.mtm sum).
        sim = self.mtm(q, k, self.logit_scale)
        query_layer = self.split_heads(q)  # (B, h, N, dh)
        key_layer = self.split_heads(k)  # (B, h, N, dh)
        value_layer = self.split_heads(v)  # (B, h, N, dh)

        # == To Implement == Attention: multi-head scaled dot-product reconstruction
        # query_layer, key_layer, value_layer: (B, h, N, dh), h = self.num_attention_heads heads of
        # dh = self.attention_head_size.
        #   1. attention_scores = q k^T / sqrt(dh) -> (B, h, N, N); attention_probs = softmax over the last dim
        #   2. attention_map = attention_probs averaged over the heads -> (B, N, N), before dropout
        #   3. context = self.dropout(attention_probs) v -> (B, h, N, dh), heads merged back -> (B, N, d)
        # No residual link or LayerNorm here: they follow the block.
        attention_scores = query_layer @ key_layer.transpose(-1, -2) / math.sqrt(self.attention_head_size)
        attention_probs = F.softmax(attention_scores, dim=-1)  # (B, h, N, N)
        attention_map = attention_probs.mean(dim=1)  # (B, N, N)
        context = self.dropout(attention_probs) @ value_layer  # (B, h, N, dh)
        B, h, N, dh = context.shape
        context = context.transpose(1, 2).reshape(B, N, h * dh)  # (B, N, d)
        # == End ==

        # X^c = LayerNorm(X + X^u): the residual is the block's input.
        output = self.layer_norm(context + query_states)
        return output, sim, attention_map


class SCORER(nn.Module):
    """One encoder block; the same weights update both views."""

    def __init__(self, cfg):
        super().__init__()
        self.attention = Attention(cfg)

    def forward(self, query_states, key_states, value_states):
        return self.attention(query_states, key_states, value_states)


class EncoderOutput(NamedTuple):
    """What the encoder gives the decoder, the losses, the CBR head and the figures."""
    out: torch.Tensor  # (B, N, emb_dim) the difference representation X~_c, for the decoder
    sim_ba: Optional[torch.Tensor]  # (B, B) S of the last block, "before" matched to "after" (None: not computed)
    sim_ab: Optional[torch.Tensor]  # (B, B) the same, "after" matched to "before"
    bef_tokens: torch.Tensor  # (B, N, d) X~_bef, for the CBR head
    aft_tokens: torch.Tensor  # (B, N, d) X~_aft
    attention_ba: Optional[torch.Tensor]  # (B, N, N) the last block's attention of "before" over "after"
    attention_ab: Optional[torch.Tensor]  # (B, N, N) and of "after" over "before"


class ChangeDetector(nn.Module):
    """Encodes a (before, after) feature pair into the difference representation (B, N, emb_dim).

    Every block can compute S; the reference computes it in each of them, but only the last block's
    enters the loss, so the model that owns the encoder has only that one computed, in training
    (models/captioner.py), which gives the same losses.
    """

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

    def embed_view(self, x):
        """X~ = conv2(X) + pos(X), as tokens: (B, feat_dim, H, W) -> (B, N, d)."""
        H, W = x.shape[-2:]
        return (self.img(x) + self.position_encoding(H, W)).flatten(2).transpose(1, 2)  # (B, N, d)

    def forward(self, x_bef, x_aft):
        """x_bef, x_aft: (B, feat_dim, H, W) -> EncoderOutput (the similarities and maps of the last block)."""
        bef = bef_tokens = self.embed_view(x_bef)  # (B, N, d)
        aft = aft_tokens = self.embed_view(x_aft)  # (B, N, d)

        sim_ba = sim_ab = att_ba = att_ab = None
        for block in self.scorer:
            bef_prev = bef
            bef, sim_ba, att_ba = block(bef, aft, aft)
            # The "after" view attends to the "before" tokens from before this block (reference order).
            aft, sim_ab, att_ab = block(aft, bef_prev, bef_prev)

        out = self.embed_fc(torch.cat([bef, aft], dim=-1))  # (B, N, emb_dim)
        return EncoderOutput(out, sim_ba, sim_ab, bef_tokens, aft_tokens, att_ba, att_ab)
