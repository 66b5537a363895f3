"""models/SCORER.py: coordinates, learned positions, where the similarity is computed, shapes."""
import pytest
import torch

from models.captioner import CaptionModel
from models.SCORER import AddSpatialInfo, ChangeDetector
from tests.helpers import small_cfg


def test_add_spatial_info_coordinates():
    out = AddSpatialInfo()(torch.zeros(2, 3, 4, 5))
    assert out.shape == (2, 5, 4, 5)
    for r in range(4):
        for c in range(5):
            assert out[1, 3, r, c].item() == pytest.approx(2 * c / 5 - 1)
            assert out[1, 4, r, c].item() == pytest.approx(2 * r / 4 - 1)


@pytest.mark.snippets
def test_learned_position_encoding_is_column_then_row():
    detector = ChangeDetector(small_cfg())
    pos = detector.position_encoding(3, 5)
    assert pos.shape == (16, 3, 5)
    assert torch.equal(pos[:8, 2, 4], detector.w_embedding.weight[4])
    assert torch.equal(pos[8:, 2, 4], detector.h_embedding.weight[2])
    with pytest.raises(ValueError, match="larger than model.change_detector.grid"):
        detector.position_encoding(9, 2)


@pytest.mark.snippets
def test_similarity_only_where_the_loss_uses_it_unless_every_block_is_asked():
    torch.manual_seed(0)
    x_bef, x_aft = torch.randn(3, 10, 4, 2), torch.randn(3, 10, 4, 2)
    cfg = small_cfg("model.change_detector.att_layer", "3")
    for every_block, expected in ((False, [False, False, False, False, True, True]), (True, [True] * 6)):
        detector = CaptionModel(cfg, similarity_in_every_block=every_block).change_detector
        calls = []
        for block in detector.scorer:
            block.register_forward_hook(lambda module, args, output: calls.append(output[1] is not None))
        detector.train()
        encoded = detector(x_bef, x_aft)
        assert calls == expected  # two views per block; by default S in the last block only
        assert encoded.out.shape == (3, 8, 16) and encoded.sim_ba.shape == encoded.sim_ab.shape == (3, 3)
        assert encoded.bef_tokens.shape == encoded.aft_tokens.shape == (3, 8, 16)
        calls.clear()
        detector.eval()
        with torch.no_grad():
            assert (detector(x_bef, x_aft).sim_ba is not None) == every_block and calls == [every_block] * 6


@pytest.mark.snippets
def test_batch_one_and_attention_maps():
    detector = ChangeDetector(small_cfg()).eval()
    encoded = detector(torch.randn(1, 10, 3, 2), torch.randn(1, 10, 3, 2))
    assert encoded.out.shape == (1, 6, 16) and encoded.sim_ba.shape == (1, 1)  # a bare detector: S everywhere
    att_ba, att_ab = encoded.attention_ba, encoded.attention_ab
    assert att_ba.shape == att_ab.shape == (1, 6, 6)
    assert torch.allclose(att_ba.sum(-1), torch.ones(1, 6))
