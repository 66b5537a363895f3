"""Captions for every scene of a loader, and writing them, for validation (train.py) and test.py."""
import os

import torch

from utils.device import autocast_context, move_batch
from utils.fileio import write_json_atomic
from utils.layout import CAPTION_FILES
from utils.utils import decode_sequence


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
                sc_seq = model.generate(batch["d_feat"], batch["q_feat"], beam_size=beam_size).tokens
                nsc_seq = model.generate(batch["d_feat"], batch["n_feat"], beam_size=beam_size).tokens
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


def write_captions(folder, sc_results, nsc_results):
    """The captions of the changed and of the distractor pairs as evaluate.py reads them, each file atomically."""
    os.makedirs(folder, exist_ok=True)
    for name, results in zip(CAPTION_FILES, (sc_results, nsc_results)):
        write_json_atomic(os.path.join(folder, name), results)
