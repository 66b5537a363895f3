"""Shared data fixtures: a tiny synthetic CLEVR-Change set with labels and features.

``tiny_data`` (session scope) renders 40 small scenes, builds the vocabulary and label file,
and extracts ResNet-18 layer3 features with random weights (64 x 64 input -> 256 x 4 x 4).
``tiny_cfg(paths, **overrides)`` (``from tests.conftest import tiny_cfg``) returns a frozen
config pointing at it; overrides use dotted keys (``**{"data.swap_prob": 1.0}``) or double
underscores (``data__swap_prob=1.0``).
"""
import os
import sys

import pytest
import torch

# The tests use tiny tensors: one thread avoids two threads fighting for the cores (on a busy
# 2-core machine a tiny training step took seconds instead of 0.04 s). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "scripts")):
    if path not in sys.path:
        sys.path.insert(0, path)

TINY_SCENES = 40
TINY_IMAGE = (64, 48)  # rendered width x height
TINY_FEATURE_INPUT = 64  # square network input -> a 4 x 4 layer3 grid


def make_tiny_data(root, num_scenes=TINY_SCENES, seed=0):
    """Generate, preprocess and extract a tiny data set under ``root``; returns its paths."""
    from generate_synthetic_clevr import IMAGE_DIRS, generate
    from extract_features import extract
    from preprocess_captions_transformer import preprocess

    root = str(root)
    generate(root, num_scenes, seed=seed, width=TINY_IMAGE[0], height=TINY_IMAGE[1], workers=1,
             supersample=1, progress=False)
    paths = {
        "root": root,
        "images": os.path.join(root, IMAGE_DIRS["default"]),
        "sc_images": os.path.join(root, IMAGE_DIRS["semantic"]),
        "nsc_images": os.path.join(root, IMAGE_DIRS["nonsemantic"]),
        "features": os.path.join(root, "features"),
        "sc_features": os.path.join(root, "sc_features"),
        "nsc_features": os.path.join(root, "nsc_features"),
        "splits": os.path.join(root, "splits.json"),
        "vocab": os.path.join(root, "transformer_vocab.json"),
        "h5": os.path.join(root, "transformer_labels.h5"),
        "type_mapping": os.path.join(root, "type_mapping.json"),
        "anno": os.path.join(root, "total_change_captions_reformat.json"),
        "scenes": os.path.join(root, "scenes.json"),
        "change_captions": os.path.join(root, "change_captions.json"),
        "no_change_captions": os.path.join(root, "no_change_captions.json"),
    }
    preprocess(paths["change_captions"], paths["no_change_captions"], paths["images"],
               paths["splits"], paths["vocab"], paths["h5"])
    for img, feat in (("images", "features"), ("sc_images", "sc_features"),
                      ("nsc_images", "nsc_features")):
        extract(paths[img], paths[feat], batch_size=64, image_height=TINY_FEATURE_INPUT,
                image_width=TINY_FEATURE_INPUT, model_name="resnet18", weights="random",
                seed=seed, device="cpu", progress=False)
    return paths


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Paths of a 40-scene synthetic data set (see ``make_tiny_data``); treat it as read-only."""
    return make_tiny_data(tmp_path_factory.mktemp("tiny_data"))


def tiny_cfg(paths, **overrides):
    """A frozen config for ``paths`` (from ``tiny_data``) with small, fast settings."""
    import json

    import numpy as np
    from configs.defaults import get_cfg_defaults

    cfg = get_cfg_defaults()
    d = cfg.data
    d.default_img_dir, d.semantic_img_dir = paths["images"], paths["sc_images"]
    d.nonsemantic_img_dir = paths["nsc_images"]
    d.default_feature_dir, d.semantic_feature_dir = paths["features"], paths["sc_features"]
    d.nonsemantic_feature_dir = paths["nsc_features"]
    d.splits_json, d.vocab_json, d.h5_label_file = paths["splits"], paths["vocab"], paths["h5"]
    d.type_mapping_json, d.anno_json = paths["type_mapping"], paths["anno"]
    d.num_workers = 0
    d.train.batch_size = d.val.batch_size = d.test.batch_size = 4

    feature_dir = paths["features"]
    first = sorted(os.listdir(feature_dir))[0]
    channels, height, width = np.load(os.path.join(feature_dir, first), mmap_mode="r").shape
    cfg.model.change_detector.feat_dim = channels + 2
    cfg.model.change_detector.grid = max(height, width)
    with open(paths["vocab"]) as f:
        cfg.model.speaker.vocab_size = len(json.load(f))
    cfg.logger.visdom = False
    cfg.train.max_iter = 4
    cfg.train.snapshot_interval = 2
    cfg.exp_dir = os.path.join(paths["root"], "experiments")

    pairs = []
    for key, value in overrides.items():
        pairs += [key.replace("__", "."), repr(value) if not isinstance(value, str) else value]
    cfg.merge_from_list(pairs)
    cfg.freeze()
    return cfg
