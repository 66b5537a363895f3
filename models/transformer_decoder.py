"""Transformer decoder (Speaker) that turns the difference representation into a caption.

Shapes: B batch, L caption positions, N grid tokens, d = att_dim, h heads, dh = d / h, V vocabulary.
Decoding caches each layer's projected keys and values, so a step costs one token.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from utils.utils import Dropout

NULL, UNK, START, END = 0, 1, 2, 3


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
        """Adds pe[offset : offset + L] to x (..., L, n_filters); offset serves cached decoding."""
        return x + self.pe[offset:offset + x.size(-2)].to(x.dtype)


def _split_heads(x, heads):
    B, L, d = x.shape
    return x.view(B, L, heads, d // heads).transpose(1, 2)  # (B, h, L, dh)


def _merge_heads(x):
    B, h, L, dh = x.shape
    return x.transpose(1, 2).reshape(B, L, h * dh)  # (B, L, d)


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
        self.dropout = Dropout(dec.dropout)

    def forward(self, query_states, key_states, value_states, attention_mask, cache=None):
        """query_states: (B, Lq, d); key/value_states: (B, Lk, d).

        attention_mask: (B, Lq, Lk) with 1 where a query may look and 0 elsewhere (padding times
        causal), or None for no mask. cache: a dict that, during decoding, holds the keys and
        values of earlier steps; the new ones are appended.
        """
        q = self.query(query_states)  # (B, Lq, d)
        k = self.key(key_states)  # (B, Lk, d)
        v = self.value(value_states)  # (B, Lk, d)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=1)  # (B, Lcache + Lk, d)
                v = torch.cat([cache["v"], v], dim=1)
            cache["k"], cache["v"] = k, v

        # == To Implement == Self-attention
        # Given the projected q (B, Lq, d), k and v (B, Lk, d):
        #   1. split into self.num_attention_heads heads of size self.attention_head_size -> (B, h, L, dh)
        #   2. attention_scores = q k^T / sqrt(dh)  -> (B, h, Lq, Lk)
        #   3. if attention_mask is not None, add (1 - attention_mask) * -10000.0 (broadcast over heads)
        #   4. softmax over the last dim, then self.dropout
        #   5. context = probs v, heads merged back -> (B, Lq, d)
        qh = _split_heads(q, self.num_attention_heads)  # (B, h, Lq, dh)
        kh = _split_heads(k, self.num_attention_heads)  # (B, h, Lk, dh)
        vh = _split_heads(v, self.num_attention_heads)  # (B, h, Lk, dh)
        attention_scores = qh @ kh.transpose(-1, -2) / math.sqrt(self.attention_head_size)  # (B, h, Lq, Lk)
        if attention_mask is not None:
            attention_scores = attention_scores + (1.0 - attention_mask.unsqueeze(1)) * -10000.0
        attention_probs = self.dropout(F.softmax(attention_scores, dim=-1))
        context = _merge_heads(attention_probs @ vh)  # (B, Lq, d)
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
        self.dropout = Dropout(dec.dropout)

    def forward(self, query_states, key_states, value_states, cache=None):
        """query_states: (B, L, d); key/value_states: (B, N, emb_dim).

        Returns (context (B, L, d), the pre-softmax scores averaged over heads (B, L, N)).
        cache: during decoding the grid's keys and values are projected once and kept there.
        """
        q = self.query(query_states)  # (B, L, d)
        if cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        elif cache is not None:
            # Stored (N, B, d) in memory and seen as (B, N, d): splitting the heads then gives
            # (B*h)-batched matrices without a copy, at each of the decoding steps.
            k = self.key(key_states.transpose(0, 1)).transpose(0, 1)  # (B, N, d)
            v = self.value(value_states.transpose(0, 1)).transpose(0, 1)  # (B, N, d)
            cache["k"], cache["v"] = k, v
        else:
            k = self.key(key_states)  # (B, N, d)
            v = self.value(value_states)  # (B, N, d)

        # == To Implement == Cross-attention
        # Same as self-attention without a mask: split q (B, L, d), k and v (B, N, d) into
        # self.num_attention_heads heads, attention_scores = q k^T / sqrt(dh) -> (B, h, L, N),
        # softmax over the last dim, self.dropout, context = probs v with heads merged -> (B, L, d).
        # Keep the name `attention_scores` (pre-softmax): its head average is returned below.
        qh = _split_heads(q, self.num_attention_heads)  # (B, h, L, dh)
        kh = _split_heads(k, self.num_attention_heads)  # (B, h, N, dh)
        vh = _split_heads(v, self.num_attention_heads)  # (B, h, N, dh)
        attention_scores = qh @ kh.transpose(-1, -2) / math.sqrt(self.attention_head_size)  # (B, h, L, N)
        attention_probs = self.dropout(F.softmax(attention_scores, dim=-1))
        context = _merge_heads(attention_probs @ vh)  # (B, L, d)
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
        self.dropout = Dropout(dropout)
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
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.hidden_intermediate = Intermediate(d)
        self.output = Output(d, cfg.model.speaker.dropout)
        self.recompute = cfg.train.recompute_attention

    def forward(self, x, mask, enc, cache=None):
        """x: (B, L, d); mask: (B, L, L) or None; enc: (B, N, emb_dim). Returns (B, L, d), (B, L, N)."""
        self_cache = cross_cache = None
        if cache is not None:
            self_cache = cache.setdefault("self", {})
            cross_cache = cache.setdefault("cross", {})
        a = self.norm1(self.self_attention(x, x, x, mask, self_cache) + x)
        if self.recompute and cache is None and torch.is_grad_enabled():
            # The grid's projected keys and values (B, N, d) and the probabilities are rebuilt in
            # backward instead of being stored, with the same dropout mask.
            context, attention = checkpoint(self.dec_enc_attention, a, enc, enc, use_reentrant=False)
        else:
            context, attention = self.dec_enc_attention(a, enc, enc, cross_cache)
        c = self.norm2(a + context)
        return self.output(self.hidden_intermediate(c)), attention


class DynamicCore(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dec = cfg.model.speaker
        self.embed = nn.Embedding(dec.vocab_size, dec.word_dim, padding_idx=NULL)
        self.position_enc = PositionEncoding(dec.word_dim, dec.seq_length)
        self.fc = nn.Sequential(
            nn.Linear(dec.word_dim, dec.att_dim), Dropout(dec.dropout),
            nn.LayerNorm(dec.att_dim, eps=1e-6))
        self.layer = nn.ModuleList([DecoderLayer(cfg) for _ in range(dec.layer)])

    def forward(self, seq, mask, enc, caches=None, offset=0):
        """seq: (B, L) tokens; mask: (B, L, L) or None; enc: (B, N, emb_dim).

        Returns the last layer's hidden states (B, L, d) and cross-attention scores (B, L, N).
        With caches (one dict per layer), seq holds only the new tokens at position ``offset``.
        """
        hidden = self.fc(self.position_enc(self.embed(seq), offset))  # (B, L, d)
        attention = None
        for index, layer in enumerate(self.layer):
            hidden, attention = layer(hidden, mask, enc, None if caches is None else caches[index])
        return hidden, attention


def causal_padding_mask(seq_mask):
    """(B, L) caption mask -> (B, L, L): position i may attend to j <= i where j is a real token."""
    L = seq_mask.size(1)
    causal = torch.tril(torch.ones(L, L, device=seq_mask.device, dtype=seq_mask.dtype))
    return seq_mask.unsqueeze(1) * causal  # (B, L, L)


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
            self.logit = nn.Linear(dec.att_dim, dec.vocab_size)
            self.logit.weight = self.core.embed.weight
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
        hidden, _ = self.core(seq, causal_padding_mask(seq_mask.to(enc.dtype)), enc)
        return self.logit(hidden), hidden

    def _next_log_probs(self, hidden):
        logits = self.logit(hidden).float()  # (B, V)
        logits[:, [NULL, UNK, START]] = float("-inf")  # never emitted
        return F.log_softmax(logits, dim=-1)

    def _step(self, enc, prefix, caches):
        """Log-probabilities of the next token and the cross-attention of the newest position.

        With caches only the newest token is run; without, the whole prefix is recomputed.
        """
        if caches is not None:
            hidden, attention = self.core(prefix[:, -1:], None, enc, caches, offset=prefix.size(1) - 1)
        else:
            hidden, attention = self.core(prefix, causal_padding_mask(
                torch.ones(prefix.shape, device=enc.device, dtype=enc.dtype)), enc)
        return self._next_log_probs(hidden[:, -1]), attention[:, -1]

    @torch.no_grad()
    def sample(self, enc, sample_max=True, temperature=1.0, beam_size=1, use_cache=True,
               return_attention=False):
        """Generates captions for enc (B, N, emb_dim).

        Greedy by default; sample_max=False samples from softmax(logits / temperature); beam_size > 1
        runs beam search. Returns tokens (B, seq_length) without <START>, <NULL> after <END>, and
        their log-probabilities (B, seq_length); with return_attention also the cross-attention of
        each step (B, seq_length, N).
        """
        if beam_size > 1:
            seq, logprobs, attention = self._beam_search(enc, beam_size, use_cache)
        else:
            seq, logprobs, attention = self._sample(enc, sample_max, temperature, use_cache)
        return (seq, logprobs, attention) if return_attention else (seq, logprobs)

    def _sample(self, enc, sample_max, temperature, use_cache):
        B = enc.size(0)
        caches = [{} for _ in self.core.layer] if use_cache else None
        prefix = torch.full((B, 1), START, dtype=torch.long, device=enc.device)
        seq = torch.zeros(B, self.seq_length, dtype=torch.long, device=enc.device)
        logprobs = torch.zeros(B, self.seq_length, device=enc.device)
        attention = enc.new_zeros(B, self.seq_length, enc.size(1))
        done = torch.zeros(B, dtype=torch.bool, device=enc.device)
        for t in range(self.seq_length):
            step_logprobs, attention[:, t] = self._step(enc, prefix, caches)
            if sample_max:
                token = step_logprobs.argmax(dim=-1)
            else:
                token = torch.multinomial(F.softmax(step_logprobs / temperature, dim=-1), 1).squeeze(1)
            token = token.masked_fill(done, NULL)
            seq[:, t] = token
            logprobs[:, t] = step_logprobs.gather(1, token.unsqueeze(1)).squeeze(1).masked_fill(done, 0.0)
            done = done | (token == END)
            if done.all():
                break
            prefix = torch.cat([prefix, token.unsqueeze(1)], dim=1)
        return seq, logprobs, attention

    def _beam_search(self, enc, K, use_cache):
        B, N, _ = enc.shape
        V = self.vocab_size
        enc = enc.repeat_interleave(K, dim=0)  # (B*K, N, e): beams of one image are adjacent
        caches = [{} for _ in self.core.layer] if use_cache else None
        prefix = torch.full((B * K, 1), START, dtype=torch.long, device=enc.device)
        seq = torch.zeros(B * K, self.seq_length, dtype=torch.long, device=enc.device)
        token_logprobs = torch.zeros(B * K, self.seq_length, device=enc.device)
        attention = enc.new_zeros(B * K, self.seq_length, N)
        # Only the first beam is live at the start, so the K beams do not all pick the same word.
        scores = torch.full((B, K), float("-inf"), device=enc.device)
        scores[:, 0] = 0.0
        done = torch.zeros(B * K, dtype=torch.bool, device=enc.device)
        for t in range(self.seq_length):
            step_logprobs, step_attention = self._step(enc, prefix, caches)  # (B*K, V)
            # A finished beam can only continue with <NULL> at no cost.
            finished = torch.full_like(step_logprobs, float("-inf"))
            finished[:, NULL] = 0.0
            step_logprobs = torch.where(done.unsqueeze(1), finished, step_logprobs)
            candidates = (scores.view(B * K, 1) + step_logprobs).view(B, K * V)
            scores, flat = candidates.topk(K, dim=1)  # (B, K)
            source = (flat // V + torch.arange(B, device=enc.device).unsqueeze(1) * K).view(-1)  # (B*K,)
            token = (flat % V).view(-1)  # (B*K,)

            seq, token_logprobs, attention = seq[source], token_logprobs[source], attention[source]
            seq[:, t] = token
            token_logprobs[:, t] = step_logprobs[source, token]
            attention[:, t] = step_attention[source]
            done = done[source] | (token == END)
            if caches is not None:
                for cache in caches:
                    cache["self"]["k"] = cache["self"]["k"][source]
                    cache["self"]["v"] = cache["self"]["v"][source]
            if done.all():
                break
            prefix = torch.cat([prefix[source], token.unsqueeze(1)], dim=1)
        best = scores.argmax(dim=1) + torch.arange(B, device=enc.device) * K  # (B,)
        return seq[best], token_logprobs[best], attention[best]
