"""models/transformer_decoder.py and models/decoding.py: masks, cached decoding, beam search, sampling."""
import pytest
import torch

from models import decoding
from models.transformer_decoder import Speaker, additive_attention_mask
from tests.helpers import small_cfg


def test_additive_mask_is_padding_times_causal_for_training_and_for_one_step():
    real = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])
    mask = additive_attention_mask(real, 4)
    assert mask.shape == (2, 1, 4, 4)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                allowed = j <= i and real[b, j] == 1
                assert mask[b, 0, i, j].item() == (0.0 if allowed else -10000.0)
    # One decoding step: the newest position sees every real token so far.
    step = additive_attention_mask(torch.ones(3, 5), 1)
    assert step.shape == (3, 1, 1, 5) and not step.any()
    # The last two positions of a prefix of five.
    tail = additive_attention_mask(torch.ones(1, 5), 2)
    assert tail[0, 0].tolist() == [[0, 0, 0, 0, -10000.0], [0, 0, 0, 0, 0]]


def sharp_speaker(*overrides):
    """A Speaker with larger weights than the 0.02 init: sharper, more varied predictions."""
    speaker = Speaker(small_cfg(*overrides)).eval()
    for module in speaker.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.5)
    return speaker


@pytest.mark.snippets
@pytest.mark.parametrize("beam_size", [1, 3])
def test_cached_decoding_equals_recomputing_the_prefix(beam_size):
    torch.manual_seed(8)
    speaker = sharp_speaker("model.speaker.seq_length", "9")
    enc = torch.randn(4, 6, 16)
    cached, cached_lp, cached_att = decoding.generate(speaker, enc, beam_size=beam_size, use_cache=True)
    plain, plain_lp, plain_att = decoding.generate(speaker, enc, beam_size=beam_size, use_cache=False)
    assert torch.equal(cached, plain)
    assert torch.allclose(cached_lp, plain_lp, atol=1e-5)
    assert torch.allclose(cached_att, plain_att, atol=1e-5)
    assert not (cached == 1).any()  # <UNK> is never emitted
    for row in cached.tolist():  # nothing but <NULL> after <END>
        if 3 in row:
            assert all(t == 0 for t in row[row.index(3) + 1:])


@pytest.mark.snippets
def test_beam_search_finds_at_least_the_greedy_score():
    torch.manual_seed(9)
    speaker = sharp_speaker()
    enc = torch.randn(5, 6, 16)
    _, greedy_lp, _ = decoding.generate(speaker, enc)
    _, beam_lp, _ = decoding.generate(speaker, enc, beam_size=4)
    assert (beam_lp.sum(1) >= greedy_lp.sum(1) - 1e-5).all()


@pytest.mark.snippets
def test_sampling_with_temperature_is_seeded():
    speaker = Speaker(small_cfg()).eval()
    enc = torch.randn(3, 6, 16)
    torch.manual_seed(10)
    first = decoding.generate(speaker, enc, sample_max=False, temperature=2.0)[0]
    torch.manual_seed(10)
    second = decoding.generate(speaker, enc, sample_max=False, temperature=2.0)[0]
    assert torch.equal(first, second)


@pytest.mark.snippets
def test_tied_output_layer_has_the_reference_keys_and_shares_the_embedding():
    speaker = Speaker(small_cfg("model.speaker.share_wd_cls_weight", "True", "model.speaker.word_dim", "16"))
    keys = set(speaker.state_dict())
    assert {"logit.decoder.weight", "logit.bias"} <= keys and "logit.weight" not in keys
    assert speaker.logit.decoder.weight is speaker.core.embed.weight
    logits, _ = speaker(torch.randn(2, 6, 16), torch.tensor([[2, 5, 3, 0, 0, 0, 0]] * 2), torch.ones(2, 7))
    assert logits.shape == (2, 7, 11)
