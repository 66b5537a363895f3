"""Helpers the tests share: small model configs, the tiny data set, running the command-line tools."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

from configs.defaults import get_cfg_defaults, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_SCENES = 40
TINY_IMAGE = (64, 48)  # rendered width x height
TINY_FEATURE_INPUT = 64  # square network input -> a 4 x 4 layer3 grid

# A small model for the tiny data set, and the smallest one (one block, one layer, one validation
# scene): seconds per training run on 2 busy cores.
SMALL_MODEL = {"model.change_detector.att_dim": 32, "model.change_detector.emb_dim": 32,
               "model.speaker.att_dim": 32, "model.speaker.word_dim": 16, "model.cbr.att_dim": 32}
FAST = {**SMALL_MODEL, "model.change_detector.att_layer": 1, "model.speaker.layer": 1,
        "data.val.max_samples": 1}


def small_cfg(*overrides):
    """A frozen config with tiny dimensions (no data); extra KEY VALUE pairs go on top."""
    base = ["model.change_detector.feat_dim", "10", "model.change_detector.att_dim", "16",
            "model.change_detector.att_head", "4", "model.change_detector.emb_dim", "16",
            "model.change_detector.grid", "8", "model.change_detector.mtm_chunk", "2",
            "model.speaker.word_dim", "12", "model.speaker.att_dim", "16", "model.speaker.att_head", "4",
            "model.speaker.vocab_size", "11", "model.speaker.seq_length", "7",
            "model.cbr.att_dim", "16", "model.cbr.att_head", "4"]
    return load_config(None, base + [str(o) for o in overrides])


def extraction_settings(**changes):
    """data.extraction of the defaults with ``changes``, as the plain dict the extractor takes."""
    from utils.extraction import settings_from_config

    cfg = get_cfg_defaults()
    cfg.data.extraction.merge_from_list([item for key, value in changes.items() for item in (key, repr(value))])
    return settings_from_config(cfg.data.extraction)


# ResNet-18 layer3 features with random weights (64 x 64 input -> 256 x 4 x 4).
TINY_EXTRACTION = {"model": "resnet18", "weights": "random", "image_size": (TINY_FEATURE_INPUT, TINY_FEATURE_INPUT)}


def make_tiny_data(root, num_scenes=TINY_SCENES, seed=0):
    """Generate, preprocess and extract (TINY_EXTRACTION) a tiny data set under ``root``; returns its paths."""
    from scripts.preprocess_captions_transformer import preprocess
    from utils.extraction import extract
    from utils.synthetic.scenes import IMAGE_DIRS
    from utils.synthetic.writing import generate

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
        extract(paths[img], paths[feat], extraction_settings(**TINY_EXTRACTION, seed=seed), batch_size=64,
                device="cpu", progress=False)
    return paths


def tiny_cfg(paths, **overrides):
    """A frozen config for ``paths`` (from the tiny_data fixture) with small, fast settings.

    Overrides use dotted keys (``**{"data.swap_prob": 1.0}``) or double underscores (``data__swap_prob=1.0``).
    """
    cfg = get_cfg_defaults()
    d = cfg.data
    d.default_img_dir, d.semantic_img_dir = paths["images"], paths["sc_images"]
    d.nonsemantic_img_dir = paths["nsc_images"]
    d.default_feature_dir, d.semantic_feature_dir = paths["features"], paths["sc_features"]
    d.nonsemantic_feature_dir = paths["nsc_features"]
    d.splits_json, d.vocab_json, d.h5_label_file = paths["splits"], paths["vocab"], paths["h5"]
    d.type_mapping_json, d.anno_json = paths["type_mapping"], paths["anno"]
    d.num_workers = 0
    d.extraction.merge_from_list([item for key, value in TINY_EXTRACTION.items() for item in (key, repr(value))])
    d.train.batch_size = d.val.batch_size = d.test.batch_size = 4

    first = sorted(os.listdir(paths["features"]))[0]
    channels, height, width = np.load(os.path.join(paths["features"], first), mmap_mode="r").shape
    cfg.model.change_detector.feat_dim = channels + 2
    cfg.model.change_detector.grid = max(height, width)
    with open(paths["vocab"]) as f:
        cfg.model.speaker.vocab_size = len(json.load(f))
    cfg.gpu_id = -1
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


def tree_digest(root):
    """{relative path: sha256} of every file under root (to check that nothing changed)."""
    digest = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digest


def one_thread_env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run_cli(*args, env=None, timeout=180, cwd=ROOT):
    """A project command line (python SCRIPT ARGS...) in a subprocess; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env or one_thread_env(), timeout=timeout)


def assert_cli_error(proc, *fragments):
    """Exit 2, an `error: ...` line on stderr naming every fragment, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors, proc.stderr
    for fragment in fragments:
        assert fragment in errors[-1], (fragment, errors[-1])


def write_cfg(cfg, folder, name="cfg.yaml"):
    """Dumps a config to YAML (for the command-line tools); returns the path."""
    path = os.path.join(str(folder), name)
    with open(path, "w") as handle:
        handle.write(cfg.dump())
    return path
