"""Transformer decoder (Speaker) that turns the difference representation into a caption.

Shapes: B batch, L caption positions, N grid tokens, d = att_dim, h heads, dh = d / h, V vocabulary.
Caption generation (greedy, sampling, beam search, with cached keys and values) is in models/decoding.py.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.text import NULL_ID


class PositionEncoding(nn.Module):
    """Fixed sinusoidal position encoding (Vaswani et al. 2017) added to (..., L, n_filters) inputs."""

    def __init__(self, n_filters=512, max_len=24):
        super().__init__()
        # == To Implement == sinusoidal position table
        # Build pe of shape (max_len, n_filters):
        #   pe[pos, 2i]   = sin(pos / 10000^(2i / n_filters))
        #   pe[pos, 2i+1] = cos(pos / 10000^(2i / n_filters))
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)  # (max_len, 1)
        even = torch.arange(0, n_filters, 2, dtype=torch.float32)  # the 2i values
        angle = position / torch.pow(10000.0, even / n_filters)  # (max_len, ceil(n/2))
        pe = torch.zeros(max_len, n_filters)
        pe[:, 0::2] = torch.sin(angle)
        pe[:, 1::2] = torch.cos(angle[:, :n_filters // 2])
        # == End ==
        self.register_buffer("pe", pe)  # persistent: reference snapshots store it

    def forward(self, x, offset=0):
        """Adds pe[offset : offset + L] to x (..., L, n_filters); offset serves step-by-step decoding."""
        return x + self.pe[offset:offset + x.size(-2)].to(x.dtype)


def additive_attention_mask(key_mask, query_length):
    """(B, Lk) mask of real tokens (1) and padding (0) -> additive mask (B, 1, Lq, Lk) for self-attention.

    The Lq queries are the last Lq positions; query i may look at key j when j is a real token at
    or before the query's position (padding mask times causal mask). Allowed pairs get 0, the others
    -10000, as in the reference: the (Lq, Lk) = (L, L) training mask and the (1, t) mask of one
    decoding step are the same formula.
    """
    B, Lk = key_mask.shape
    causal = torch.ones(query_length, Lk, device=key_mask.device, dtype=key_mask.dtype).tril(Lk - query_length)
    allowed = key_mask.unsqueeze(1) * causal  # (B, Lq, Lk)
    return ((1.0 - allowed) * -10000.0).unsqueeze(1)  # (B, 1, Lq, Lk)


class SelfAttention(nn.Module):
    """Masked multi-head self-attention over the caption (no output projection, no residual)."""

    def __init__(self, cfg):
        super().__init__()
        dec = cfg.model.speaker
        if dec.att_dim % dec.att_head:
            raise ValueError(f"model.speaker.att_dim ({dec.att_dim}) must be divisible by "
                             f"model.speaker.att_head ({dec.att_head})")
        self.num_attention_heads = dec.att_head
        self.attention_head_size = dec.att_dim // dec.att_head
        self.query = nn.Linear(dec.att_dim, dec.att_dim)
        self.key = nn.Linear(dec.att_dim, dec.att_dim)
        self.value = nn.Linear(dec.att_dim, dec.att_dim)
        self.dropout = nn.Dropout(dec.dropout)

    def split_heads(self, x):
        B, L, _ = x.shape
        return x.view(B, L, self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # (B, h, L, dh)

    def forward(self, query_states, key_states, value_states, attention_mask, cache=None):
        """query_states: (B, Lq, d); key/value_states: (B, Lk, d); attention_mask: (B, 1, Lq, Lk),
        additive (see additive_attention_mask). cache: during decoding, the keys and values of the
        earlier steps (models/decoding.py); the new ones are appended. Returns (B, Lq, d)."""
        query_layer = self.split_heads(self.query(query_states))  # (B, h, Lq, dh)
        key_layer = self.split_heads(self.key(key_states))  # (B, h, Lk, dh)
        value_layer = self.split_heads(self.value(value_states))  # (B, h, Lk, dh)
        if cache is not None:  # decoding: the keys and values of the earlier steps come first
            key_layer, value_layer = cache.append(key_layer, value_layer)

        # == To Implement == Self-attention
        # query_layer: (B, h, Lq, dh); key_layer, value_layer: (B, h, Lk, dh), h = self.num_attention_heads
        # heads of dh = self.attention_head_size; attention_mask: (B, 1, Lq, Lk), 0 or -10000.
        #   1. attention_scores = q k^T / sqrt(dh) + attention_mask -> (B, h, Lq, Lk)
        #   2. attention_probs = softmax over the last dim, then self.dropout
        #   3. context = attention_probs v -> (B, h, Lq, dh), heads merged back -> (B, Lq, d)
        attention_scores = query_layer @ key_layer.transpose(-1, -2) / math.sqrt(self.attention_head_size)
        attention_scores = attention_scores + attention_mask  # (B, h, Lq, Lk)
        attention_probs = self.dropout(F.softmax(attention_scores, dim=-1))
        context = attention_probs @ value_layer  # (B, h, Lq, dh)
        B, h, Lq, dh = context.shape
        context = context.transpose(1, 2).reshape(B, Lq, h * dh)  # (B, Lq, d)
        # == End ==
        return context


class CrossAttention(nn.Module):
    """Multi-head attention from caption positions to the grid tokens (no mask, no residual)."""

    def __init__(self, cfg):
        super().__init__()
        dec = cfg.model.speaker
        self.num_attention_heads = dec.att_head
        self.attention_head_size = dec.att_dim // dec.att_head
        self.query = nn.Linear(dec.att_dim, dec.att_dim)
        self.key = nn.Linear(cfg.model.change_detector.emb_dim, dec.att_dim)
        self.value = nn.Linear(cfg.model.change_detector.emb_dim, dec.att_dim)
        self.dropout = nn.Dropout(dec.dropout)

    def split_heads(self, x):
        B, L, _ = x.shape
        return x.view(B, L, self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # (B, h, L, dh)

    def project_grid(self, key_states, value_states):
        """The grid's keys and values, (B, h, N, dh) each."""
        return self.split_heads(self.key(key_states)), self.split_heads(self.value(value_states))

    def forward(self, query_states, key_states, value_states, cache=None):
        """query_states: (B, L, d); key/value_states: (B, N, emb_dim).

        Returns (context (B, L, d), the pre-softmax scores averaged over heads (B, L, N)).
        cache: during decoding the grid is projected at the first step only (models/decoding.py).
        """
        query_layer = self.split_heads(self.query(query_states))  # (B, h, L, dh)
        if cache is None:
            key_layer, value_layer = self.project_grid(key_states, value_states)  # (B, h, N, dh)
        else:
            key_layer, value_layer = cache.once(self.project_grid, key_states, value_states)

        # == To Implement == Cross-attention
        # query_layer: (B, h, L, dh); key_layer, value_layer: (B, h, N, dh). As in self-attention,
        # without a mask: attention_scores = q k^T / sqrt(dh) -> (B, h, L, N), softmax over the last
        # dim, self.dropout, context = probs v with the heads merged back -> (B, L, d).
        # Keep the name `attention_scores` (pre-softmax): its head average is returned below.
        attention_scores = query_layer @ key_layer.transpose(-1, -2) / math.sqrt(self.attention_head_size)
        attention_probs = self.dropout(F.softmax(attention_scores, dim=-1))  # (B, h, L, N)
        context = attention_probs @ value_layer  # (B, h, L, dh)
        B, h, L, dh = context.shape
        context = context.transpose(1, 2).reshape(B, L, h * dh)  # (B, L, d)
        # == End ==
        return context, attention_scores.mean(dim=1)


class Intermediate(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dense = nn.Linear(d, d)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) gelu


class Output(nn.Module):
    def __init__(self, d, dropout):
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, hidden):
        # Quirk kept from the reference: the residual adds the feed-forward's own input activation.
        return self.LayerNorm(self.dropout(self.dense(hidden)) + hidden)


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.model.speaker.att_dim
        self.self_attention = SelfAttention(cfg)
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.dec_enc_attention = CrossAttention(cfg)
        self.hidden_intermediate = Intermediate(d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.output = Output(d, cfg.model.speaker.dropout)

    def forward(self, x, mask, enc, cache=None):
        """x: (B, L, d); mask: (B, 1, L, Lk) additive; enc: (B, N, emb_dim); cache: during decoding,
        a (self-attention, cross-attention) pair of caches. Returns (B, L, d) and the scores (B, L, N)."""
        self_cache, cross_cache = (None, None) if cache is None else cache
        a = self.norm1(self.self_attention(x, x, x, mask, self_cache) + x)
        context, attention = self.dec_enc_attention(a, enc, enc, cross_cache)
        c = self.norm2(a + context)
        return self.output(self.hidden_intermediate(c)), attention


class DynamicCore(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dec = cfg.model.speaker
        # Registered in the reference's order (fc, position_enc, embed, layer): the same seed gives
        # the same initial weights.
        self.fc = nn.Sequential(
            nn.Linear(dec.word_dim, dec.att_dim), nn.Dropout(dec.dropout),
            nn.LayerNorm(dec.att_dim, eps=1e-6))
        self.position_enc = PositionEncoding(dec.word_dim, dec.seq_length)
        self.embed = nn.Embedding(dec.vocab_size, dec.word_dim, padding_idx=NULL_ID)
        self.layer = nn.ModuleList([DecoderLayer(cfg) for _ in range(dec.layer)])

    def forward(self, seq, mask, enc, caches=None, offset=0):
        """seq: (B, L) tokens; mask: (B, 1, L, Lk) additive; enc: (B, N, emb_dim).

        Returns the last layer's hidden states (B, L, d) and cross-attention scores (B, L, N).
        During decoding (caches: one per layer), seq holds the new tokens at position ``offset``.
        """
        hidden = self.fc(self.position_enc(self.embed(seq), offset))  # (B, L, d)
        attention = None
        for index, layer in enumerate(self.layer):
            hidden, attention = layer(hidden, mask, enc, None if caches is None else caches[index])
        return hidden, attention


class TiedLogit(nn.Module):
    """Output layer that shares the word embedding's weights (model.speaker.share_wd_cls_weight)."""

    def __init__(self, embedding):
        super().__init__()
        self.decoder = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False)
        self.decoder.weight = embedding.weight
        self.bias = nn.Parameter(torch.zeros(embedding.num_embeddings))

    def forward(self, hidden):
        return self.decoder(hidden) + self.bias


class Speaker(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dec = cfg.model.speaker
        self.vocab_size = dec.vocab_size
        self.seq_length = dec.seq_length
        self.core = DynamicCore(cfg)
        if dec.share_wd_cls_weight:
            if dec.word_dim != dec.att_dim:
                raise ValueError("model.speaker.share_wd_cls_weight needs model.speaker.word_dim == "
                                 f"model.speaker.att_dim (got {dec.word_dim} and {dec.att_dim})")
            self.logit = TiedLogit(self.core.embed)
        else:
            self.logit = nn.Linear(dec.att_dim, dec.vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def forward(self, enc, seq, seq_mask):
        """Teacher forcing. enc: (B, N, emb_dim); seq: (B, L) <START> w.. <END> <NULL>..; seq_mask: (B, L).

        Returns logits (B, L, V) (position t predicts token t+1) and the last hidden states (B, L, d).
        """
        mask = additive_attention_mask(seq_mask.to(enc.dtype), seq.size(1))  # (B, 1, L, L)
        hidden, _ = self.core(seq, mask, enc)
        return self.logit(hidden), hidden
