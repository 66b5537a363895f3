"""Encoders for ablation studies (model.change_detector.encoder); the default is SCORER (models/SCORER.py)."""
import torch

from models.SCORER import ChangeDetector, EncoderOutput


class SubtractionEncoder(ChangeDetector):
    """The paper's "subtraction" baseline: no SCORER blocks and no matching loss.

    Both views are embedded as in SCORER (X~ = conv2(X) + pos(X)); the difference representation is
    ReLU([X~_bef; X~_aft - X~_bef] W_h + b_h), with embed_fc as W_h (its dropout included).
    """

    def __init__(self, cfg):
        cfg = cfg.clone()
        cfg.defrost()
        cfg.model.change_detector.att_layer = 0  # no SCORER blocks
        cfg.freeze()
        super().__init__(cfg)

    def forward(self, x_bef, x_aft):
        """As ChangeDetector.forward; the similarities and attention maps are None."""
        bef = self.embed_view(x_bef)  # (B, N, d)
        aft = self.embed_view(x_aft)  # (B, N, d)
        out = self.embed_fc(torch.cat([bef, aft - bef], dim=-1))  # (B, N, emb_dim)
        return EncoderOutput(out, None, None, bef, aft, None, None)
