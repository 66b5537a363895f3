"""The model core checked against slow, independent formulas (loops, float64)."""
import math
import os

import pytest
import torch

from configs.defaults import ConfigError, load_config
from models.CBR import CBR, CrossEn as CBRCrossEn
from models.SCORER import AddSpatialInfo, Attention, ChangeDetector, token_wise_similarity
from models.transformer_decoder import CrossAttention, PositionEncoding, SelfAttention, Speaker
from tests.model_helpers import small_cfg
from utils.engine import CaptionModel
from utils.utils import CrossEn as UtilsCrossEn, labels_with_ignore



def slow_info_nce(sim):
    total = 0.0
    for k in range(len(sim)):
        denominator = sum(math.exp(value) for value in sim[k])
        total += -math.log(math.exp(sim[k][k]) / denominator)
    return total / len(sim)


def slow_attention(q, k, v, heads, mask=None):
    """Multi-head attention by loops; q (Lq, d), k/v (Lk, d), mask (Lq, Lk) of 0/1. Returns context, head-mean probs, head-mean scores."""
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
                if mask is not None and mask[i][j] == 0:
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


@pytest.mark.snippets
def test_info_nce_both_copies_match_the_slow_formula():
    torch.manual_seed(0)
    sim = torch.randn(5, 5, dtype=torch.float64) * 3
    expected = slow_info_nce(sim.tolist())
    assert CBRCrossEn()(sim).item() == pytest.approx(expected, rel=1e-10)
    assert UtilsCrossEn()(sim).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.snippets
def test_position_encoding_values():
    n_filters, max_len = 10, 24
    pe = PositionEncoding(n_filters, max_len).pe
    assert pe.shape == (max_len, n_filters)
    for pos in range(max_len):
        for i in range(n_filters // 2):
            angle = pos / 10000 ** (2 * i / n_filters)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    x = torch.zeros(2, 5, n_filters)
    assert torch.equal(PositionEncoding(n_filters, max_len)(x), pe[:5].expand(2, 5, n_filters))


def test_add_spatial_info_coordinates():
    out = AddSpatialInfo()(torch.zeros(2, 3, 4, 5))
    assert out.shape == (2, 5, 4, 5)
    for r in range(4):
        for c in range(5):
            assert out[1, 3, r, c].item() == pytest.approx(2 * c / 5 - 1)
            assert out[1, 4, r, c].item() == pytest.approx(2 * r / 4 - 1)


@pytest.mark.snippets
def test_self_attention_matches_loops_with_causal_and_padding_mask():
    torch.manual_seed(1)
    cfg = small_cfg()
    attention = SelfAttention(cfg).double().eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    pad = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.float64)
    mask = pad.unsqueeze(1) * torch.tril(torch.ones(6, 6, dtype=torch.float64))
    out = attention(x, x, x, mask)
    for b in range(2):
        q, k, v = (layer(x[b]).tolist() for layer in (attention.query, attention.key, attention.value))
        expected, _, _ = slow_attention(q, k, v, 4, mask[b].tolist())
        assert torch.allclose(out[b], expected.double(), atol=1e-9)

    # Causality: changing later tokens never changes earlier outputs.
    changed = x.clone()
    changed[:, 4:] = torch.randn(2, 2, 16, dtype=torch.float64)
    out_changed = attention(changed, changed, changed, mask)
    assert torch.allclose(out[:, :4], out_changed[:, :4], atol=1e-12)
    assert not torch.allclose(out[0, 4:], out_changed[0, 4:])


@pytest.mark.snippets
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


@pytest.mark.snippets
def test_scorer_attention_reconstruction_and_map():
    torch.manual_seed(3)
    attention = Attention(small_cfg()).double().eval()
    a = torch.randn(2, 6, 16, dtype=torch.float64)
    b = torch.randn(2, 6, 16, dtype=torch.float64)
    out, sim, attention_map = attention(a, b, b, compute_similarity=False)
    assert sim is None
    for i in range(2):
        context, mean_probs, _ = slow_attention(attention.query(a[i]).tolist(), attention.key(b[i]).tolist(),
                                                attention.value(b[i]).tolist(), 4)
        expected = attention.layer_norm(context.double() + a[i])
        assert torch.allclose(out[i], expected, atol=1e-9)
        assert torch.allclose(attention_map[i], mean_probs.double(), atol=1e-9)


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
    heads = [token_wise_similarity(q[..., h * 3:(h + 1) * 3], k[..., h * 3:(h + 1) * 3], scale, 1, 5) for h in range(2)]
    assert torch.allclose(per_head, (heads[0] + heads[1]) / 2, atol=1e-12)


@pytest.mark.snippets
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


@pytest.mark.snippets
def test_gradcheck_each_snippet():
    torch.manual_seed(6)
    cfg = small_cfg("model.change_detector.dropout", "0.0", "model.speaker.dropout", "0.0")
    sim = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(CBRCrossEn(), (sim,))
    assert torch.autograd.gradcheck(UtilsCrossEn(), (sim,))

    x = torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True)
    enc = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.tril(torch.ones(4, 4, dtype=torch.float64)).expand(2, 4, 4)
    self_attention = SelfAttention(cfg).double()
    assert torch.autograd.gradcheck(lambda t: self_attention(t, t, t, mask), (x,))
    cross = CrossAttention(cfg).double()
    assert torch.autograd.gradcheck(lambda t, e: cross(t, e, e)[0], (x, enc))
    attention = Attention(cfg).double()
    assert torch.autograd.gradcheck(lambda a, b: attention(a, b, b, compute_similarity=False)[0], (x, enc[:, :4]))
    # The sinusoidal table is a constant; its gradient check is that it passes gradients through unchanged.
    assert torch.autograd.gradcheck(PositionEncoding(12, 7).double(), (torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True),))


@pytest.mark.snippets
def test_full_forward_backward_on_a_5x7_grid():
    torch.manual_seed(7)
    cfg = small_cfg()
    model = CaptionModel(cfg)
    B, L = 2, 7
    feats = {k: torch.randn(B, 8, 5, 7) for k in ("d_feat", "q_feat", "n_feat")}
    labels = torch.tensor([[[2, 5, 6, 7, 3, 0, 0]], [[2, 8, 3, 0, 0, 0, 0]]])
    masks = (torch.arange(L) <= torch.tensor([4, 2]).view(B, 1, 1)).float()
    batch = {**feats, "pos_labels": labels, "pos_masks": masks, "neg_labels": labels.flip(0), "neg_masks": masks.flip(0)}
    losses = model(batch, lambda_v=0.1, lambda_m=0.001)
    assert set(losses) == {"total", "caption", "cross_view", "cross_modal"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    for name, parameter in model.named_parameters():
        if name == "change_detector.scorer.0.attention.logit_scale":
            assert parameter.grad is None  # only the last block's similarity enters the loss
        else:
            assert parameter.grad is not None, name
    assert model.cbr.conv1.weight.grad.abs().sum() > 0  # the CBR head trains (the reference's bug is fixed)

    model.eval()
    seq, logprobs = model.generate(feats["d_feat"], feats["q_feat"])
    assert seq.shape == (B, cfg.model.speaker.seq_length) and logprobs.shape == seq.shape
    out = ChangeDetector(cfg).eval()(torch.randn(1, 10, 3, 2), torch.randn(1, 10, 3, 2))
    assert out[0].shape == (1, 6, 16) and out[1] is None  # batch 1, no similarity in eval


def test_labels_with_ignore():
    seq = torch.tensor([[2, 5, 6, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert labels_with_ignore(seq, mask).tolist() == [[5, 6, 3, -1, -1, -1]]


@pytest.mark.snippets
@pytest.mark.parametrize("beam_size", [1, 3])
def test_cached_decoding_equals_recomputing_the_prefix(beam_size):
    torch.manual_seed(8)
    cfg = small_cfg("model.speaker.seq_length", "9")
    speaker = Speaker(cfg).eval()
    for module in speaker.modules():  # sharper, more varied predictions than the 0.02 init gives
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.5)
    enc = torch.randn(4, 6, 16)
    cached, cached_lp = speaker.sample(enc, beam_size=beam_size, use_cache=True)
    plain, plain_lp = speaker.sample(enc, beam_size=beam_size, use_cache=False)
    assert torch.equal(cached, plain)
    assert torch.allclose(cached_lp, plain_lp, atol=1e-5)
    assert not (cached == 1).any()  # <UNK> is never emitted
    for row in cached.tolist():  # nothing but <NULL> after <END>
        if 3 in row:
            assert all(t == 0 for t in row[row.index(3) + 1:])


@pytest.mark.snippets
def test_beam_search_finds_at_least_the_greedy_score():
    torch.manual_seed(9)
    speaker = Speaker(small_cfg()).eval()
    for module in speaker.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.5)
    enc = torch.randn(5, 6, 16)
    _, greedy_lp = speaker.sample(enc)
    _, beam_lp = speaker.sample(enc, beam_size=4)
    assert (beam_lp.sum(1) >= greedy_lp.sum(1) - 1e-5).all()


@pytest.mark.snippets
def test_sampling_with_temperature_is_seeded():
    speaker = Speaker(small_cfg()).eval()
    enc = torch.randn(3, 6, 16)
    torch.manual_seed(10)
    first, _ = speaker.sample(enc, sample_max=False, temperature=2.0)
    torch.manual_seed(10)
    second, _ = speaker.sample(enc, sample_max=False, temperature=2.0)
    assert torch.equal(first, second)


@pytest.mark.snippets
def test_state_dicts_match_the_reference_names_and_shapes():
    cfg = load_config("configs/dynamic/transformer.yaml")
    ours = set()
    for prefix, module in (("change_detector_state", ChangeDetector(cfg)), ("speaker_state", Speaker(cfg)),
                           ("cbr_state", CBR(cfg))):
        ours |= {f"{prefix}.{key} {tuple(value.shape)}" for key, value in module.state_dict().items()}
    with open(os.path.join(os.path.dirname(__file__), "reference_state_dict.txt")) as handle:
        reference = {line.strip() for line in handle if line.strip() and not line.startswith("#")}
    assert ours == reference


def test_config_rejects_unknown_keys_and_wrong_types(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.max_iters'"):
        load_config(None, ["train.max_iters", "5"])
    with pytest.raises(ConfigError, match="train.max_iter must be of type int"):
        load_config(None, ["train.max_iter", "many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  speaker:\n    heads: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.speaker.heads'"):
        load_config(str(bad))
    bad.write_text("train:\n  lambda_v: [1, 2]\n")
    with pytest.raises(ConfigError, match="train.lambda_v must be of type float"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  optim:\n    lr: 2e-4\n  grad_clip: 5\n")
    cfg = load_config(str(good), ["train.lambda_m", "0.01"])
    assert cfg.train.optim.lr == 2e-4 and cfg.train.grad_clip == 5.0 and cfg.train.lambda_m == 0.01
    assert cfg.is_frozen()


def test_every_default_key_has_a_comment():
    with open("configs/defaults.py") as handle:
        for line in handle:
            if line.startswith("_C.") and "= CN()" not in line:
                assert "#" in line, f"no comment on: {line.strip()}"


@pytest.mark.parametrize("heads", [1, 2])
def test_sparse_mtm_backward_equals_autograd(heads):
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
    assert torch.autograd.gradcheck(lambda a, b: token_wise_similarity(a, b, scale.detach(), heads, 2), (small_q, small_k))
