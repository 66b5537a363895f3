"""utils/utils.py and utils/text.py: caption targets, label smoothing, decoding, tokenising."""
import math

import pytest
import torch

from utils.text import END_ID, NULL_ID, START_ID, decode
from utils.utils import LabelSmoothingLoss, decode_sequence, labels_with_ignore


def test_labels_with_ignore():
    seq = torch.tensor([[2, 5, 6, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert labels_with_ignore(seq, mask).tolist() == [[5, 6, 3, -1, -1, -1]]


def test_label_smoothing_is_kl_to_the_smoothed_targets_over_all_entries():
    torch.manual_seed(0)
    eps, V = 0.2, 6
    logits = torch.randn(4, V, dtype=torch.float64)
    target = torch.tensor([2, -1, 0, 5])
    loss = LabelSmoothingLoss(eps, V)(logits, target).item()
    total, entries = 0.0, 0
    for row, t in zip(logits.tolist(), target.tolist()):
        if t == -1:
            continue
        log_norm = math.log(sum(math.exp(x) for x in row))
        for v in range(V):
            p = 1 - eps if v == t else eps / (V - 1)
            total += p * (math.log(p) - (row[v] - log_norm))
            entries += 1
    assert loss == pytest.approx(total / entries, rel=1e-10)


def test_decoding_stops_at_end_or_null_and_skips_start():
    idx_to_word = {4: "the", 5: "cube", 6: "moved"}
    assert decode([START_ID, 4, 5, 6, END_ID, 4], idx_to_word) == "the cube moved"
    assert decode([START_ID, 4, NULL_ID, 5], idx_to_word) == "the"
    assert decode_sequence(idx_to_word, torch.tensor([[4, 5, END_ID, 0], [6, 0, 0, 0]])) == ["the cube", "moved"]
