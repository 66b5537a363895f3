"""Cross-modal backward reasoning (CBR): rebuild the "after" view from the "before" view and the caption."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.SCORER import token_wise_similarity


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


class ContraAttention(nn.Module):
    """MTM similarity (full-d token-wise matching) between hallucinated and real "after" tokens."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.model.cbr.att_dim
        self.mtm_chunk = cfg.model.change_detector.mtm_chunk
        self.sparse_backward = cfg.model.change_detector.mtm_sparse_backward
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, hal_tokens, aft_tokens):
        """hal_tokens, aft_tokens: (B, N, d) -> S (B, B)."""
        return token_wise_similarity(self.query(hal_tokens), self.key(aft_tokens), self.logit_scale,
                                     heads=1, chunk=self.mtm_chunk, sparse_backward=self.sparse_backward)


class CBR(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.model.cbr.att_dim
        if d != cfg.model.change_detector.att_dim:
            raise ValueError(f"model.cbr.att_dim ({d}) must equal model.change_detector.att_dim "
                             f"({cfg.model.change_detector.att_dim})")
        self.conv1 = nn.Conv2d(2 * d, d, kernel_size=1)
        self.mh_att = nn.MultiheadAttention(d, cfg.model.cbr.att_head, bias=False, batch_first=True)
        self.conv2 = nn.Sequential(nn.Conv2d(d, d, kernel_size=1))
        self.contra = ContraAttention(cfg)
        self.cross_entropy = CrossEn()
        self.recompute = cfg.train.recompute_attention

    def forward(self, bef_tokens, sent_hidden, aft_tokens, caption_mask):
        """bef_tokens, aft_tokens: (B, N, d); sent_hidden: (B, L, d); caption_mask: (B, L).

        Returns the cross-modal loss L_cm = (InfoNCE(S) + InfoNCE(S^T)) / 2.
        """
        d = bef_tokens.size(-1)
        # Quirk kept from the reference: the mean divides by L, not by the caption's length.
        sentence = (sent_hidden * caption_mask.unsqueeze(-1).to(sent_hidden.dtype)).mean(dim=1)  # (B, d)
        # A 1x1 convolution is a linear map per token. conv1 over concat(bef, sentence broadcast over
        # the tokens) splits into its "before" half per token plus its sentence half once per pair,
        # which spares the (B, 2d, N) concatenation and half the products.
        weight = self.conv1.weight.view(d, 2 * d)  # (d, 2d)
        hallucinated = (F.linear(bef_tokens, weight[:, :d], self.conv1.bias)
                        + F.linear(sentence, weight[:, d:]).unsqueeze(1))  # (B, N, d)
        if self.recompute and torch.is_grad_enabled():
            # Rebuilt in backward: of the block's activations (projections, attention output) only
            # its input is kept.
            attended, _ = checkpoint(self.mh_att, hallucinated, hallucinated, hallucinated, need_weights=False,
                                     use_reentrant=False)  # (B, N, d)
        else:
            attended, _ = self.mh_att(hallucinated, hallucinated, hallucinated, need_weights=False)  # (B, N, d)
        conv2 = self.conv2[0]
        hal_tokens = F.linear(attended, conv2.weight.view(d, d), conv2.bias)  # (B, N, d), conv2 per token
        sim = self.contra(hal_tokens, aft_tokens)  # (B, B)
        return (self.cross_entropy(sim) + self.cross_entropy(sim.t())) / 2
