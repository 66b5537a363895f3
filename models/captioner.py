"""The captioning model as training and testing use it: encoder, decoder and CBR head, their losses,
caption generation, and rebuilding a trained model from a snapshot."""
import os
import types

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from configs.defaults import get_cfg_defaults, merge_dict
from models import decoding
from models.baselines import SubtractionEncoder
from models.CBR import CBR
from models.SCORER import AddSpatialInfo, ChangeDetector
from models.transformer_decoder import Speaker
from utils.checkpoint import SnapshotError, list_snapshots, load_snapshot, load_weights, snapshot_path
from utils.device import autocast_context, move_batch
from utils.distributed import global_token_mean
from utils.utils import CrossEn, LabelSmoothingLoss, decode_sequence, labels_with_ignore


def _recomputed_forward(self, *args, **kwargs):
    forward = type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)


def recompute_in_backward(module):
    """In training, ``module`` keeps only its inputs; its activations are rebuilt in backward (with the
    same dropout masks): less memory for one more forward. State-dict keys stay as they are."""
    module.forward = types.MethodType(_recomputed_forward, module)


class CaptionModel(nn.Module):
    """Encoder, decoder and CBR head under the names the snapshots use.

    recompute: rebuild the attention blocks (encoder blocks, CBR self-attention, decoder
    cross-attention) in backward instead of storing their activations (train.recompute_attention).
    similarity_in_every_block: compute the MTM similarity in every encoder block, as the reference
    does (the straightforward variant of scripts/benchmark.py); the losses are the same.
    """

    def __init__(self, cfg, recompute=False, similarity_in_every_block=False):
        super().__init__()
        self.spatial_info = AddSpatialInfo()
        if cfg.model.change_detector.encoder == "subtraction":
            self.change_detector = SubtractionEncoder(cfg)
        else:
            self.change_detector = ChangeDetector(cfg, similarity_in_every_block)
        self.speaker = Speaker(cfg)
        self.cbr = CBR(cfg)
        self.cross_entropy = CrossEn()
        smoothing = cfg.model.speaker.label_smoothing
        self.label_smoothing = LabelSmoothingLoss(smoothing, cfg.model.speaker.vocab_size) if smoothing > 0 else None
        if recompute:
            blocks = [block.attention for block in self.change_detector.scorer]
            blocks += [self.cbr.mh_att] + [layer.dec_enc_attention for layer in self.speaker.core.layer]
            for module in blocks:
                recompute_in_backward(module)

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
        out, sim_ba, sim_ab, bef_tokens, aft_tokens = self.change_detector(bef, aft, compute_similarity=True)
        B, S, L = labels.shape
        seq = labels.reshape(B * S, L)  # (B*S, L)
        seq_mask = masks.reshape(B * S, L).to(out.dtype)  # (B*S, L)
        enc = out if S == 1 else out.repeat_interleave(S, dim=0)  # (B*S, N, emb_dim)
        logits, hidden = self.speaker(enc, seq, seq_mask)  # (B*S, L, V), (B*S, L, d)
        target = labels_with_ignore(seq, seq_mask)
        # With several processes: the mean over the tokens of the global batch (utils/distributed.py).
        cap = global_token_mean(self.caption_loss(logits, target), (target != -1).sum())
        if sim_ba is None:  # an encoder without matching (models/baselines.py)
            cross_view = cap.new_zeros(())
        else:
            cross_view = (self.cross_entropy(sim_ba.float()) + self.cross_entropy(sim_ab.float())) / 2
        # The CBR head contrasts pairs across the batch, so it takes one caption per pair.
        first = hidden.view(B, S, L, -1)[:, 0]  # (B, L, d)
        cross_modal = self.cbr(bef_tokens, first, aft_tokens, seq_mask.view(B, S, L)[:, 0])
        return cap, cross_view, cross_modal.float()

    def forward(self, batch, lambda_v, lambda_m):
        """The training losses of a batch (both the changed and the distractor pair)."""
        bef = self.spatial_info(batch["d_feat"])  # one tensor for both pairs: autograd keeps it once
        pos = self.pair_losses(bef, self.spatial_info(batch["q_feat"]), batch["pos_labels"], batch["pos_masks"])
        neg = self.pair_losses(bef, self.spatial_info(batch["n_feat"]), batch["neg_labels"], batch["neg_masks"])
        caption, cross_view, cross_modal = ((p + n) / 2 for p, n in zip(pos, neg))
        total = caption + lambda_v * cross_view + lambda_m * cross_modal
        return {"total": total, "caption": caption, "cross_view": cross_view, "cross_modal": cross_modal}

    def encode(self, bef_feat, aft_feat, return_attention=False):
        """The change detector's outputs (ChangeDetector.forward) for pairs (B, C, H, W), without the similarities."""
        return self.change_detector(self.spatial_info(bef_feat), self.spatial_info(aft_feat),
                                    compute_similarity=False, return_attention=return_attention)

    @torch.no_grad()
    def generate(self, bef_feat, aft_feat, beam_size=1, sample_max=True, temperature=1.0,
                 return_attention=False, use_cache=True):
        """Captions for pairs (B, C, H, W): tokens (B, L), log-probs; optionally the attention maps
        ({"encoder": (A_ba, A_ab), "decoder": (B, L, N)})."""
        encoded = self.encode(bef_feat, aft_feat, return_attention)
        seq, logprobs, decoder_attention = decoding.generate(
            self.speaker, encoded[0], sample_max=sample_max, temperature=temperature, beam_size=beam_size,
            use_cache=use_cache)
        if return_attention:
            return seq, logprobs, {"encoder": encoded[5], "decoder": decoder_attention}
        return seq, logprobs


def scene_key(image_id):
    return f"{int(image_id):06d}.png"


@torch.no_grad()
def generate_captions(model, loader, idx_to_word, device, beam_size=1, amp="none", progress=None,
                      should_stop=None):
    """Captions for every scene in loader: (sc_results, nsc_results) as COCO result lists.

    Image ids are "000123.png" for the changed pair and "000123.png_n" for the distractor pair.
    should_stop() is asked before each batch; when it says True the result is (None, None).
    """
    was_training = model.training
    model.eval()
    sc_results, nsc_results = [], []
    try:
        for batch in loader:
            if should_stop is not None and should_stop():
                return None, None
            batch = move_batch(batch, device)
            with autocast_context(device, amp):
                sc_seq, _ = model.generate(batch["d_feat"], batch["q_feat"], beam_size=beam_size)
                nsc_seq, _ = model.generate(batch["d_feat"], batch["n_feat"], beam_size=beam_size)
            keys = [scene_key(i) for i in batch["image_id"].tolist()]
            for key, sentence in zip(keys, decode_sequence(idx_to_word, sc_seq)):
                sc_results.append({"image_id": key, "caption": sentence})
            for key, sentence in zip(keys, decode_sequence(idx_to_word, nsc_seq)):
                nsc_results.append({"image_id": key + "_n", "caption": sentence})
            if progress is not None:
                progress.update(len(keys))
    finally:
        model.train(was_training)
    return sc_results, nsc_results


def model_config(cfg, snapshot, path):
    """The config for rebuilding a snapshot's model: its model keys over the defaults (so keys added
    since it was written keep their default), this run's data and device keys."""
    merged = cfg.clone()
    merged.defrost()
    merged.model = get_cfg_defaults().model
    merge_dict(merged.model, snapshot["config"]["model"], f"{path} (its stored config)", "model.")
    merged.freeze()
    return merged


def load_trained_model(cfg, iteration, device):
    """(model in eval mode, idx_to_word, model config) rebuilt from the experiment's snapshot ``iteration``."""
    path = snapshot_path(cfg, iteration)
    if not os.path.isfile(path):
        available = list_snapshots(cfg)
        raise SnapshotError(f"no snapshot for iteration {iteration} ({path}); available: "
                            + (", ".join(map(str, available)) if available else "none — train first"))
    snapshot = load_snapshot(path)
    cfg = model_config(cfg, snapshot, path)
    model = CaptionModel(cfg)
    load_weights(model.change_detector, snapshot["change_detector_state"], "change_detector_state", path)
    load_weights(model.speaker, snapshot["speaker_state"], "speaker_state", path)
    model.to(device).eval()
    idx_to_word = {index: word for word, index in snapshot["vocab"].items()}
    return model, idx_to_word, cfg
