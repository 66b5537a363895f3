"""Small model configs for fast CPU tests."""
from configs.defaults import load_config


def small_cfg(*overrides, **kwargs):
    """A frozen config with tiny dimensions; extra KEY VALUE pairs go on top."""
    base = ["model.change_detector.feat_dim", "10", "model.change_detector.att_dim", "16",
            "model.change_detector.att_head", "4", "model.change_detector.emb_dim", "16",
            "model.change_detector.grid", "8", "model.change_detector.mtm_chunk", "2",
            "model.speaker.word_dim", "12", "model.speaker.att_dim", "16", "model.speaker.att_head", "4",
            "model.speaker.vocab_size", "11", "model.speaker.seq_length", "7",
            "model.cbr.att_dim", "16", "model.cbr.att_head", "4"]
    return load_config(None, base + list(overrides))
