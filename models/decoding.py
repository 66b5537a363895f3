"""Caption generation with a Speaker (models/transformer_decoder.py): greedy, sampling, beam search.

Each step runs only the newest token: every decoder layer keeps the keys and values of the earlier
steps (its self-attention cache) and the grid's projected keys and values (its cross-attention
cache). use_cache=False recomputes the whole prefix at every step instead (the same tokens; the
straightforward variant of research/benchmark.py).
"""
import torch
import torch.nn.functional as F

from models.transformer_decoder import additive_attention_mask
from utils.text import END_ID, NULL_ID, START_ID, UNK_ID


class KVCache:
    """Keys and values of one attention block during decoding, (B, h, L, dh) each."""

    def __init__(self):
        self.keys = self.values = None

    def append(self, keys, values):
        """Self-attention: adds this step's keys and values; returns those of every step so far."""
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=2)  # (B, h, t, dh)
            values = torch.cat([self.values, values], dim=2)
        self.keys, self.values = keys, values
        return keys, values

    def once(self, project, *inputs):
        """Cross-attention: project(*inputs) at the first step, the stored result afterwards (contiguous,
        so that no step copies them again for its matrix products)."""
        if self.keys is None:
            self.keys, self.values = (t.contiguous() for t in project(*inputs))
        return self.keys, self.values

    def reorder(self, rows):
        """Beam search: keep the rows of the beams that survive."""
        self.keys, self.values = self.keys[rows], self.values[rows]


def _next_log_probs(speaker, enc, prefix, caches):
    """Log-probabilities of the next token (B, V) and the newest position's cross-attention (B, N)."""
    B, t = prefix.shape
    if caches is not None:
        tokens, offset = prefix[:, -1:], t - 1
    else:
        tokens, offset = prefix, 0
    mask = additive_attention_mask(torch.ones(B, t, device=enc.device, dtype=enc.dtype), tokens.size(1))
    hidden, attention = speaker.core(tokens, mask, enc, caches, offset=offset)
    logits = speaker.logit(hidden[:, -1]).float()  # (B, V)
    logits[:, [NULL_ID, UNK_ID, START_ID]] = float("-inf")  # never emitted
    return F.log_softmax(logits, dim=-1), attention[:, -1]


def _new_caches(speaker, use_cache):
    return [(KVCache(), KVCache()) for _ in speaker.core.layer] if use_cache else None


@torch.no_grad()
def generate(speaker, enc, sample_max=True, temperature=1.0, beam_size=1, use_cache=True):
    """Captions for enc (B, N, emb_dim): greedy by default; sample_max=False samples from
    softmax(logits / temperature); beam_size > 1 runs beam search.

    Returns tokens (B, seq_length) without <START>, <NULL> after <END>, their log-probabilities
    (B, seq_length) and the cross-attention scores of each step (B, seq_length, N).
    """
    if beam_size > 1:
        return _beam_search(speaker, enc, beam_size, use_cache)
    return _sample(speaker, enc, sample_max, temperature, use_cache)


def _sample(speaker, enc, sample_max, temperature, use_cache):
    B, L = enc.size(0), speaker.seq_length
    caches = _new_caches(speaker, use_cache)
    prefix = torch.full((B, 1), START_ID, dtype=torch.long, device=enc.device)
    seq = torch.zeros(B, L, dtype=torch.long, device=enc.device)
    logprobs = torch.zeros(B, L, device=enc.device)
    attention = enc.new_zeros(B, L, enc.size(1))
    done = torch.zeros(B, dtype=torch.bool, device=enc.device)
    for t in range(L):
        step_logprobs, attention[:, t] = _next_log_probs(speaker, enc, prefix, caches)
        if sample_max:
            token = step_logprobs.argmax(dim=-1)
        else:
            token = torch.multinomial(F.softmax(step_logprobs / temperature, dim=-1), 1).squeeze(1)
        token = token.masked_fill(done, NULL_ID)
        seq[:, t] = token
        logprobs[:, t] = step_logprobs.gather(1, token.unsqueeze(1)).squeeze(1).masked_fill(done, 0.0)
        done = done | (token == END_ID)
        if done.all():
            break
        prefix = torch.cat([prefix, token.unsqueeze(1)], dim=1)
    return seq, logprobs, attention


def _beam_search(speaker, enc, K, use_cache):
    B, N, _ = enc.shape
    V, L = speaker.vocab_size, speaker.seq_length
    enc = enc.repeat_interleave(K, dim=0)  # (B*K, N, e): beams of one image are adjacent
    caches = _new_caches(speaker, use_cache)
    prefix = torch.full((B * K, 1), START_ID, dtype=torch.long, device=enc.device)
    seq = torch.zeros(B * K, L, dtype=torch.long, device=enc.device)
    token_logprobs = torch.zeros(B * K, L, device=enc.device)
    attention = enc.new_zeros(B * K, L, N)
    # Only the first beam is live at the start, so the K beams do not all pick the same word.
    scores = torch.full((B, K), float("-inf"), device=enc.device)
    scores[:, 0] = 0.0
    done = torch.zeros(B * K, dtype=torch.bool, device=enc.device)
    for t in range(L):
        step_logprobs, step_attention = _next_log_probs(speaker, enc, prefix, caches)  # (B*K, V)
        # A finished beam can only continue with <NULL> at no cost.
        finished = torch.full_like(step_logprobs, float("-inf"))
        finished[:, NULL_ID] = 0.0
        step_logprobs = torch.where(done.unsqueeze(1), finished, step_logprobs)
        candidates = (scores.view(B * K, 1) + step_logprobs).view(B, K * V)
        scores, flat = candidates.topk(K, dim=1)  # (B, K)
        source = (flat // V + torch.arange(B, device=enc.device).unsqueeze(1) * K).view(-1)  # (B*K,)
        token = (flat % V).view(-1)  # (B*K,)

        seq, token_logprobs, attention = seq[source], token_logprobs[source], attention[source]
        seq[:, t] = token
        token_logprobs[:, t] = step_logprobs[source, token]
        attention[:, t] = step_attention[source]
        done = done[source] | (token == END_ID)
        if caches is not None:
            # The grid caches need no reordering: the beams of one image share its grid.
            for self_cache, _ in caches:
                self_cache.reorder(source)
        if done.all():
            break
        prefix = torch.cat([prefix[source], token.unsqueeze(1)], dim=1)
    best = scores.argmax(dim=1) + torch.arange(B, device=enc.device) * K  # (B,)
    return seq[best], token_logprobs[best], attention[best]
