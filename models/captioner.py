"""The captioning model: encoder, decoder and CBR head under the snapshots' names, the losses of a batch,
and captions for feature pairs. Captions over a loader: utils/captioning.py; a trained model from its
snapshot: models/loading.py."""
import functools
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from models import decoding
from models import mtm  # noqa: F401  (defines torch.ops.scorer.mean_max_similarity, named below)
from models.baselines import SubtractionEncoder
from models.CBR import CBR
from models.SCORER import AddSpatialInfo, ChangeDetector
from models.transformer_decoder import Speaker
from utils.distributed import global_token_mean
from utils.utils import CrossEn, LabelSmoothingLoss, labels_with_ignore


class Captions(NamedTuple):
    """CaptionModel.generate's result."""
    tokens: torch.Tensor  # (B, L) word indices, 0 after the end
    logprobs: torch.Tensor  # (B, L) the log-probability of each chosen word
    encoder_attention: tuple  # (A_ba, A_ab), each (B, N, N): the last encoder block's maps (None without blocks)
    decoder_attention: torch.Tensor  # (B, L, N) the decoder's attention over the difference tokens


# What recomputation keeps: the outputs of the matrix products of the linear maps and 1x1 convolutions, and
# the MTM similarity (models/mtm.py), costly to run again and the size of a few token sets (B, N, d). The rest
# is rebuilt in backward, above all the (B, h, N, N) attention scores, probabilities and dropout masks,
# which hold most of the memory and are cheap to recompute.
KEPT_IN_RECOMPUTATION = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.convolution.default,
                         torch.ops.scorer.mean_max_similarity.default}


def _keep_products(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in KEPT_IN_RECOMPUTATION else CheckpointPolicy.PREFER_RECOMPUTE


class CaptionModel(nn.Module):
    """Encoder, decoder and CBR head under the names the snapshots use.

    recompute: in training, the encoder, the decoder and the CBR head keep only their inputs and the outputs of
    their matrix products (KEPT_IN_RECOMPUTATION); the rest, above all the attention maps, is rebuilt in
    backward with the same dropout masks instead of stored: less memory for a little more time, the same
    losses and gradients (train.recompute_attention).
    similarity_in_every_block: every encoder block computes its MTM similarity S, in training and in
    evaluation, as the reference does (the straightforward variant of research/benchmark.py). By default
    only the last block's S is computed, and only in training: the loss uses no other. The losses are
    the same either way.
    """

    def __init__(self, cfg, recompute=False, similarity_in_every_block=False):
        super().__init__()
        self.spatial_info = AddSpatialInfo()
        if cfg.model.change_detector.encoder == "subtraction":
            self.change_detector = SubtractionEncoder(cfg)
        else:
            self.change_detector = ChangeDetector(cfg)
        self.speaker = Speaker(cfg)
        self.cbr = CBR(cfg)
        self.cross_entropy = CrossEn()
        smoothing = cfg.model.speaker.label_smoothing
        self.label_smoothing = LabelSmoothingLoss(smoothing, cfg.model.speaker.vocab_size) if smoothing > 0 else None
        self.recompute = recompute
        blocks = list(self.change_detector.scorer)
        for block in blocks:
            block.attention.mtm.when = "always" if similarity_in_every_block else "never"
        if blocks and not similarity_in_every_block:
            blocks[-1].attention.mtm.when = "training"

    def run(self, module, *inputs):
        """module(*inputs); with recompute on, its activations but the kept ones are rebuilt in backward
        (torch's selective activation checkpointing)."""
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(module, *inputs, use_reentrant=False,
                              context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_products))
        return module(*inputs)

    def logit_scales(self):
        """{"encoder": ..., "cbr": ...}: the parameters whose exp is 1/tau of the two InfoNCE losses (the
        encoder's is that of its last block; an encoder without blocks has none)."""
        scales = {"cbr": self.cbr.contra.logit_scale}
        if len(self.change_detector.scorer):
            scales["encoder"] = self.change_detector.scorer[-1].attention.logit_scale
        return scales

    def caption_loss(self, logits, target):
        """Cross-entropy (or the reference's label smoothing) over the positions whose target is not -1."""
        logits, target = logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1)  # (B*L, V), (B*L,)
        if self.label_smoothing is not None:
            return self.label_smoothing(logits, target)
        return nn.functional.cross_entropy(logits, target, ignore_index=-1)

    def pair_losses(self, bef, aft, labels, masks):
        """Losses of one kind of pair. bef, aft: (B, C+2, H, W) features with coordinates (spatial_info);
        labels, masks: (B, S, L) with S captions per pair."""
        encoded = self.run(self.change_detector, bef, aft)
        out = encoded.out
        B, S, L = labels.shape
        seq = labels.reshape(B * S, L)  # (B*S, L)
        seq_mask = masks.reshape(B * S, L).to(out.dtype)  # (B*S, L)
        enc = out if S == 1 else out.repeat_interleave(S, dim=0)  # (B*S, N, emb_dim)
        logits, hidden = self.run(self.speaker, enc, seq, seq_mask)  # (B*S, L, V), (B*S, L, d)
        target = labels_with_ignore(seq, seq_mask)
        # With several processes: the mean over the tokens of the global batch (utils/distributed.py).
        cap = global_token_mean(self.caption_loss(logits, target), (target != -1).sum())
        if encoded.sim_ba is None:  # an encoder without matching (models/baselines.py)
            cross_view = cap.new_zeros(())
        else:
            cross_view = (self.cross_entropy(encoded.sim_ba.float()) + self.cross_entropy(encoded.sim_ab.float())) / 2
        # The CBR head contrasts pairs across the batch, so it takes one caption per pair.
        first = hidden.view(B, S, L, -1)[:, 0]  # (B, L, d)
        cross_modal = self.run(self.cbr, encoded.bef_tokens, first, encoded.aft_tokens, seq_mask.view(B, S, L)[:, 0])
        return cap, cross_view, cross_modal.float()

    def forward(self, batch, lambda_v, lambda_m):
        """The training losses of a batch (both the changed and the distractor pair)."""
        bef = self.spatial_info(batch["d_feat"])  # one tensor for both pairs: autograd keeps it once
        pos = self.pair_losses(bef, self.spatial_info(batch["q_feat"]), batch["pos_labels"], batch["pos_masks"])
        neg = self.pair_losses(bef, self.spatial_info(batch["n_feat"]), batch["neg_labels"], batch["neg_masks"])
        caption, cross_view, cross_modal = ((p + n) / 2 for p, n in zip(pos, neg))
        total = caption + lambda_v * cross_view + lambda_m * cross_modal
        return {"total": total, "caption": caption, "cross_view": cross_view, "cross_modal": cross_modal}

    def encode(self, bef_feat, aft_feat):
        """The change detector's EncoderOutput (models/SCORER.py) for feature pairs (B, C, H, W)."""
        return self.change_detector(self.spatial_info(bef_feat), self.spatial_info(aft_feat))

    @torch.no_grad()
    def generate(self, bef_feat, aft_feat, beam_size=1, sample_max=True, temperature=1.0, use_cache=True):
        """Captions for feature pairs (B, C, H, W), with the attention maps behind them."""
        encoded = self.encode(bef_feat, aft_feat)
        tokens, logprobs, decoder_attention = decoding.generate(
            self.speaker, encoded.out, sample_max=sample_max, temperature=temperature, beam_size=beam_size,
            use_cache=use_cache)
        return Captions(tokens, logprobs, (encoded.attention_ba, encoded.attention_ab), decoder_attention)
