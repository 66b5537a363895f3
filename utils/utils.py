"""Losses and helpers shared by training and testing: InfoNCE, caption targets and losses, words, seeds."""
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.text import decode


class CrossEn(nn.Module):
    """InfoNCE over an unnormalised similarity matrix whose diagonal holds the matching pairs."""

    def forward(self, sim_matrix):
        # == To Implement == InfoNCE loss
        # sim_matrix: (B, B) similarities (already divided by the temperature); row k's positive
        # is column k. Return the mean over k of -log softmax(sim_matrix[k, :])[k] (a scalar).
        log_probs = F.log_softmax(sim_matrix, dim=-1)  # (B, B)
        loss = -torch.diagonal(log_probs).mean()
        # == End ==
        return loss


class LabelSmoothingLoss(nn.Module):
    """Label smoothing as the reference defines it (model.speaker.label_smoothing > 0).

    The target word gets probability 1 - eps and every other word eps / (V - 1); the loss is the
    KL divergence from that distribution to the model's, averaged over all N x V entries of the
    positions whose target is not ``ignore_index``.
    """

    def __init__(self, label_smoothing, vocab_size, ignore_index=-1):
        super().__init__()
        self.confidence = 1.0 - label_smoothing
        self.off_target = label_smoothing / (vocab_size - 1)
        self.ignore_index = ignore_index

    def forward(self, logits, target):
        """logits: (N, V); target: (N,) word ids or ignore_index."""
        keep = target != self.ignore_index
        log_probs = F.log_softmax(logits[keep], dim=-1)  # (n, V)
        smoothed = torch.full_like(log_probs, self.off_target)
        smoothed.scatter_(1, target[keep].unsqueeze(1), self.confidence)
        return F.kl_div(log_probs, smoothed, reduction="sum") / smoothed.numel()


def labels_with_ignore(seq, seq_mask):
    """Targets for teacher forcing: position t predicts seq[t+1]; -1 where there is no real next token.

    seq: (B, L) <START> w.. <END> <NULL>..; seq_mask: (B, L) 1 up to and including <END>.
    """
    target = torch.full_like(seq, -1)
    target[:, :-1] = seq[:, 1:].masked_fill(seq_mask[:, 1:] == 0, -1)
    return target


def decode_sequence(idx_to_word, seq):
    """Token ids (B, T) -> list of B sentences (utils.text.decode: stops at <END>, skips <START>)."""
    rows = seq.tolist() if torch.is_tensor(seq) else np.asarray(seq).tolist()
    return [decode(row, idx_to_word) for row in rows]


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
