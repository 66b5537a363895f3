"""Helpers shared by train.py and test.py: losses, captions, seeds, devices."""
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NULL, UNK, START, END = 0, 1, 2, 3


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


def labels_with_ignore(seq, seq_mask):
    """Targets for teacher forcing: position t predicts seq[t+1]; -1 where there is no real next token.

    seq: (B, L) <START> w.. <END> <NULL>..; seq_mask: (B, L) 1 up to and including <END>.
    """
    target = torch.full_like(seq, -1)
    target[:, :-1] = seq[:, 1:].masked_fill(seq_mask[:, 1:] == 0, -1)
    return target


def caption_loss(logits, target, label_smoothing=0.0):
    """Cross-entropy over the positions whose target is not -1. logits: (B, L, V); target: (B, L)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1),
                           ignore_index=-1, label_smoothing=label_smoothing)


class _CpuDropout(torch.autograd.Function):
    """Dropout whose keep mask comes from 16-bit slices of random 64-bit integers.

    nn.Dropout draws one float per element from the CPU generator (about 10 ns each here); four
    16-bit draws per 64-bit integer cost a quarter of that. The drop probability p is rounded to a
    multiple of 1/65536 (0.1 -> 0.100006) and the kept values are scaled by 1/(1-p) of the rounded p,
    so the expectation is kept exactly.
    The mask comes from the default generator, so seeding and checkpoint replay work as usual.
    """

    @staticmethod
    def forward(ctx, x, threshold):
        count = x.numel()
        words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((count + 3) // 4,), dtype=torch.int64)
        drop = words.view(torch.int16)[:count].view(x.shape) < threshold - 2 ** 15  # P(drop) = threshold / 2^16
        ctx.scale = 2 ** 16 / (2 ** 16 - threshold)
        ctx.save_for_backward(drop)
        return x.masked_fill(drop, 0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        drop, = ctx.saved_tensors
        return grad.masked_fill(drop, 0).mul_(ctx.scale), None


class Dropout(nn.Dropout):
    """nn.Dropout (same arguments, no state) with a cheaper mask on the CPU; on a GPU it is nn.Dropout."""

    def forward(self, x):
        threshold = round(self.p * 2 ** 16)
        if not self.training or x.device.type != "cpu" or not 0 < threshold < 2 ** 16:
            return super().forward(x)
        return _CpuDropout.apply(x, threshold)


def decode_sequence(idx_to_word, seq):
    """Token ids (B, T) -> list of B sentences; stops at <END>, skips <NULL> and <START>."""
    sentences = []
    for row in seq.tolist() if torch.is_tensor(seq) else np.asarray(seq).tolist():
        words = []
        for token in row:
            if token == END:
                break
            if token in (NULL, START):
                continue
            words.append(idx_to_word[token])
        sentences.append(" ".join(words))
    return sentences


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(gpu_id):
    """CUDA device ``gpu_id`` when CUDA is present and gpu_id >= 0, else the CPU.

    An id that does not exist is an error naming the devices that do.
    """
    if gpu_id is None or gpu_id < 0 or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if gpu_id >= count:
        names = ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(count))
        raise ValueError(f"GPU {gpu_id} does not exist; this machine has {count} "
                         f"({names}). Pass --gpu with one of those ids, or --gpu -1 for the CPU")
    return torch.device("cuda", gpu_id)
