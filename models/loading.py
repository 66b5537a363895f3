"""A trained CaptionModel rebuilt from an experiment's snapshot, with the config it was trained with."""
import os

from configs.defaults import get_cfg_defaults, merge_dict
from models.captioner import CaptionModel
from utils.checkpoint import SnapshotError, list_snapshots, load_snapshot, load_weights, snapshot_path


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
