"""Cross-modal backward reasoning (CBR): rebuild the "after" view from the "before" view and the caption.

Shapes: B batch, N grid tokens, L caption positions, d = att_dim.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.mtm import TokenWiseMatching


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
        self.mtm = TokenWiseMatching(cfg, heads=1)  # token-wise matching over the full d (models/mtm.py)
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, hal_tokens, aft_tokens):
        """hal_tokens, aft_tokens: (B, N, d) -> S (B, B) (models/mtm.py)."""
        return self.mtm(self.query(hal_tokens), self.key(aft_tokens), self.logit_scale)


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

    def forward(self, bef_tokens, sent_hidden, aft_tokens, caption_mask):
        """bef_tokens, aft_tokens: (B, N, d); sent_hidden: (B, L, d); caption_mask: (B, L).

        Returns the cross-modal loss L_cm = (InfoNCE(S) + InfoNCE(S^T)) / 2.
        """
        B, N, d = bef_tokens.shape
        # T: quirk kept from the reference, the mean divides by L, not by the caption's length.
        sentence = (sent_hidden * caption_mask.unsqueeze(-1).to(sent_hidden.dtype)).mean(dim=1)  # (B, d)
        # 1x1 convolutions see each grid cell alone, so the N tokens stand as an N x 1 map.
        bef_map = bef_tokens.transpose(1, 2).unsqueeze(-1)  # (B, d, N, 1)
        sentence_map = sentence.view(B, d, 1, 1).expand(B, d, N, 1)  # T broadcast over the grid
        hallucinated = self.conv1(torch.cat([bef_map, sentence_map], dim=1))  # X^_hal (B, d, N, 1)
        tokens = hallucinated.flatten(2).transpose(1, 2)  # (B, N, d)
        attended, _ = self.mh_att(tokens, tokens, tokens, need_weights=False)  # MHSA, (B, N, d)
        hal_map = self.conv2(attended.transpose(1, 2).unsqueeze(-1))  # X~_hal (B, d, N, 1)
        hal_tokens = hal_map.flatten(2).transpose(1, 2)  # (B, N, d)
        sim = self.contra(hal_tokens, aft_tokens)  # (B, B)
        return (self.cross_entropy(sim) + self.cross_entropy(sim.t())) / 2
