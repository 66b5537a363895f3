"""Synthetic data sets made as the CPU demo makes them (scripts/demo.py, research/ablate.py).

Three stages, each a project command: render scenes (scripts/generate_synthetic_clevr.py),
extract features from the three image folders (scripts/extract_features.py), build the
vocabulary and label file (scripts/preprocess_captions_transformer.py). The folder gets the
layout of DATA.md, and data_overrides() points a config at it.
"""
import os
import sys

from configs.defaults import load_config
from utils.errors import UserError
from utils.extraction import describe_settings, read_stamp, settings_from_config
from utils.object_score import SCENES_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RENDER_SIZE = ("128", "96")  # width, height of the rendered images
EXTRACT_BATCH = 50  # images per extraction batch, also the BatchNorm calibration batch of the random network
# The demo's feature extraction settings live in its config (data.extraction): random-weight ResNet-101
# layer1 pooled to 7 x 7, plus colour channels (configs/dynamic/transformer_demo.yaml says why).
DEMO_CONFIG = os.path.join(ROOT, "configs", "dynamic", "transformer_demo.yaml")
IMAGE_FOLDERS = (("images", "features"), ("sc_images", "sc_features"), ("nsc_images", "nsc_features"))
# Config key -> file or folder name inside a data folder.
DATA_FILES = {"data.default_img_dir": "images", "data.semantic_img_dir": "sc_images",
              "data.nonsemantic_img_dir": "nsc_images", "data.default_feature_dir": "features",
              "data.semantic_feature_dir": "sc_features", "data.nonsemantic_feature_dir": "nsc_features",
              "data.splits_json": "splits.json", "data.vocab_json": "transformer_vocab.json",
              "data.h5_label_file": "transformer_labels.h5", "data.type_mapping_json": "type_mapping.json",
              "data.anno_json": "total_change_captions_reformat.json"}


def script(name, *args):
    """The command line of a project script, by absolute path (callers may run elsewhere)."""
    return [sys.executable, os.path.join(ROOT, "scripts", name), *map(str, args)]


def generate_command(folder, num_scenes, seed=0, viewpoint_shift=1.0):
    command = script("generate_synthetic_clevr.py", "--output_dir", folder, "--num_scenes", num_scenes,
                     "--width", RENDER_SIZE[0], "--height", RENDER_SIZE[1])
    if seed:
        command += ["--seed", str(seed)]
    if viewpoint_shift != 1.0:
        command += ["--viewpoint_shift", str(viewpoint_shift)]
    return command


def extract_command(folder, images, features):
    """Extraction with the demo config's data.extraction settings."""
    return script("extract_features.py", "--input_image_dir", f"{folder}/{images}", "--output_dir",
                  f"{folder}/{features}", "--batch_size", str(EXTRACT_BATCH), "--cfg", DEMO_CONFIG)


def preprocess_command(folder):
    return script("preprocess_captions_transformer.py",
                  "--input_captions_json", f"{folder}/change_captions.json",
                  "--input_neg_captions_json", f"{folder}/no_change_captions.json",
                  "--input_image_dir", f"{folder}/images", "--split_json", f"{folder}/splits.json",
                  "--output_vocab_json", f"{folder}/transformer_vocab.json",
                  "--output_h5", f"{folder}/transformer_labels.h5")


def generated(folder):
    return os.path.exists(os.path.join(folder, SCENES_FILE))


def extracted(folder, images, features):
    feature_dir = os.path.join(folder, features)
    return os.path.isdir(feature_dir) and (sum(name.endswith(".npy") for name in os.listdir(feature_dir))
                                           >= len(os.listdir(os.path.join(folder, images))))


def preprocessed(folder):
    return os.path.exists(os.path.join(folder, "transformer_labels.h5"))


def check_feature_settings(folder, clean_command):
    """The feature folders under ``folder`` hold features of the demo config's settings, or none yet.

    scripts/extract_features.py records a folder's settings in its extraction.json and refuses to add
    others; a folder with features but another record, or none (an older checkout), is a UserError
    naming clean_command.
    """
    expected = settings_from_config(load_config(DEMO_CONFIG).data.extraction)
    for _, features in IMAGE_FOLDERS:
        path = os.path.join(folder, features)
        if not os.path.isdir(path) or not any(name.endswith(".npy") for name in os.listdir(path)):
            continue
        found = read_stamp(path)
        if found != expected:
            raise UserError(f"the features in {path} were made with other settings "
                            f"({describe_settings(found) if found else 'unknown: no extraction.json'}; the demo "
                            f"uses {describe_settings(expected)}). Run `{clean_command}` and start again")


def data_overrides(folder):
    """KEY VALUE config overrides that point every data.* path at ``folder``."""
    pairs = []
    for key, name in DATA_FILES.items():
        pairs += [key, os.path.join(folder, name)]
    return pairs
