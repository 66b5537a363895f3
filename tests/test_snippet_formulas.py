"""The six snippets checked against slow, independent formulas (loops, float64).

These formulas spell the snippets out, so this file stays out of the student handout
(grading/snippets.py: HANDOUT_EXCLUDE); the handout checks the snippets against recorded tensors
instead (tests/test_snippets.py).
"""
import math

import pytest
import torch

from models.CBR import CBR, CrossEn as CBRCrossEn
from models.SCORER import Attention
from models.transformer_decoder import CrossAttention, PositionEncoding, SelfAttention, additive_attention_mask
from tests.helpers import small_cfg
from utils.utils import CrossEn as UtilsCrossEn

pytestmark = pytest.mark.snippets


def slow_info_nce(sim):
    total = 0.0
    for k in range(len(sim)):
        denominator = sum(math.exp(value) for value in sim[k])
        total += -math.log(math.exp(sim[k][k]) / denominator)
    return total / len(sim)


def slow_attention(q, k, v, heads, allowed=None):
    """Multi-head attention by loops; q (Lq, d), k/v (Lk, d), allowed (Lq, Lk) of 0/1.

    Returns context, head-mean probs, head-mean scores.
    """
    Lq, d = len(q), len(q[0])
    dh = d // heads
    context = [[0.0] * d for _ in range(Lq)]
    mean_probs = [[0.0] * len(k) for _ in range(Lq)]
    mean_scores = [[0.0] * len(k) for _ in range(Lq)]
    for h in range(heads):
        cols = range(h * dh, (h + 1) * dh)
        for i in range(Lq):
            scores = []
            for j in range(len(k)):
                s = sum(q[i][c] * k[j][c] for c in cols) / math.sqrt(dh)
                if allowed is not None and allowed[i][j] == 0:
                    s -= 10000.0
                scores.append(s)
                mean_scores[i][j] += s / heads
            top = max(scores)
            exps = [math.exp(s - top) for s in scores]
            probs = [e / sum(exps) for e in exps]
            for j, p in enumerate(probs):
                mean_probs[i][j] += p / heads
                for c in cols:
                    context[i][c] += p * v[j][c]
    return torch.tensor(context), torch.tensor(mean_probs), torch.tensor(mean_scores)


def test_info_nce_both_copies_match_the_slow_formula():
    torch.manual_seed(0)
    sim = torch.randn(5, 5, dtype=torch.float64) * 3
    expected = slow_info_nce(sim.tolist())
    assert CBRCrossEn()(sim).item() == pytest.approx(expected, rel=1e-10)
    assert UtilsCrossEn()(sim).item() == pytest.approx(expected, rel=1e-10)


def test_position_encoding_values():
    n_filters, max_len = 10, 24
    pe = PositionEncoding(n_filters, max_len).pe
    assert pe.shape == (max_len, n_filters)
    for pos in range(max_len):
        for i in range(n_filters // 2):
            angle = pos / 10000 ** (2 * i / n_filters)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_self_attention_matches_loops_with_causal_and_padding_mask():
    torch.manual_seed(1)
    attention = SelfAttention(small_cfg()).double().eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    pad = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.float64)
    mask = additive_attention_mask(pad, 6)
    out = attention(x, x, x, mask)
    allowed = pad.unsqueeze(1) * torch.tril(torch.ones(6, 6, dtype=torch.float64))
    for b in range(2):
        q, k, v = (layer(x[b]).tolist() for layer in (attention.query, attention.key, attention.value))
        expected, _, _ = slow_attention(q, k, v, 4, allowed[b].tolist())
        assert torch.allclose(out[b], expected.double(), atol=1e-9)

    # Causality: changing later tokens never changes earlier outputs.
    changed = x.clone()
    changed[:, 4:] = torch.randn(2, 2, 16, dtype=torch.float64)
    out_changed = attention(changed, changed, changed, mask)
    assert torch.allclose(out[:, :4], out_changed[:, :4], atol=1e-12)
    assert not torch.allclose(out[0, 4:], out_changed[0, 4:])


def test_cross_attention_matches_loops():
    torch.manual_seed(2)
    attention = CrossAttention(small_cfg()).double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    enc = torch.randn(2, 7, 16, dtype=torch.float64)
    out, scores = attention(x, enc, enc)
    for b in range(2):
        expected, _, expected_scores = slow_attention(
            attention.query(x[b]).tolist(), attention.key(enc[b]).tolist(), attention.value(enc[b]).tolist(), 4)
        assert torch.allclose(out[b], expected.double(), atol=1e-9)
        assert torch.allclose(scores[b], expected_scores.double(), atol=1e-9)


def test_scorer_attention_reconstruction_and_map():
    torch.manual_seed(3)
    attention = Attention(small_cfg()).double().eval()
    attention.mtm.when = "never"
    a = torch.randn(2, 6, 16, dtype=torch.float64)
    b = torch.randn(2, 6, 16, dtype=torch.float64)
    out, sim, attention_map = attention(a, b, b)
    assert sim is None
    for i in range(2):
        context, mean_probs, _ = slow_attention(attention.query(a[i]).tolist(), attention.key(b[i]).tolist(),
                                                attention.value(b[i]).tolist(), 4)
        expected = attention.layer_norm(context.double() + a[i])
        assert torch.allclose(out[i], expected, atol=1e-9)
        assert torch.allclose(attention_map[i], mean_probs.double(), atol=1e-9)


def test_cbr_loss_matches_a_direct_computation():
    torch.manual_seed(5)
    cbr = CBR(small_cfg()).double().eval()
    B, N, L, d = 3, 6, 5, 16
    bef, aft = torch.randn(B, N, d, dtype=torch.float64), torch.randn(B, N, d, dtype=torch.float64)
    hidden = torch.randn(B, L, d, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float64)
    loss = cbr(bef, hidden, aft, mask)

    sentence = (hidden * mask.unsqueeze(-1)).sum(1) / L  # divides by L: the reference quirk
    w1, b1 = cbr.conv1.weight[:, :, 0, 0], cbr.conv1.bias
    hallucinated = bef @ w1[:, :d].T + (sentence @ w1[:, d:].T).unsqueeze(1) + b1
    mha = torch.nn.functional.multi_head_attention_forward
    attended, _ = mha(hallucinated.transpose(0, 1), hallucinated.transpose(0, 1), hallucinated.transpose(0, 1),
                      d, 4, cbr.mh_att.in_proj_weight, None, None, None, False, 0.0,
                      cbr.mh_att.out_proj.weight, None, training=False, need_weights=False)
    hal = attended.transpose(0, 1) @ cbr.conv2[0].weight[:, :, 0, 0].T + cbr.conv2[0].bias
    q, k = cbr.contra.query(hal), cbr.contra.key(aft)
    sim = [[0.0] * B for _ in range(B)]
    for a in range(B):
        for b in range(B):
            e = q[a] @ k[b].T
            sim[a][b] = math.exp(1.0) * (e.max(1).values.mean() + e.max(0).values.mean()).item() / 2
    transposed = [list(col) for col in zip(*sim)]
    assert loss.item() == pytest.approx((slow_info_nce(sim) + slow_info_nce(transposed)) / 2, rel=1e-9)


def test_gradcheck_each_snippet():
    torch.manual_seed(6)
    cfg = small_cfg("model.change_detector.dropout", "0.0", "model.speaker.dropout", "0.0")
    sim = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(CBRCrossEn(), (sim,))
    assert torch.autograd.gradcheck(UtilsCrossEn(), (sim,))

    x = torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True)
    enc = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    mask = additive_attention_mask(torch.ones(2, 4, dtype=torch.float64), 4)
    self_attention = SelfAttention(cfg).double()
    assert torch.autograd.gradcheck(lambda t: self_attention(t, t, t, mask), (x,))
    cross = CrossAttention(cfg).double()
    assert torch.autograd.gradcheck(lambda t, e: cross(t, e, e)[0], (x, enc))
    attention = Attention(cfg).double()
    attention.mtm.when = "never"
    assert torch.autograd.gradcheck(lambda a, b: attention(a, b, b)[0], (x, enc[:, :4]))
    # The sinusoidal table is a constant; its gradient check is that it passes gradients through unchanged.
    assert torch.autograd.gradcheck(PositionEncoding(12, 7).double(),
                                    (torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True),))
