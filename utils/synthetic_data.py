"""Synthetic data sets made as the CPU demo makes them (scripts/demo.py, scripts/ablate.py).

Three stages, each a project command: render scenes (scripts/generate_synthetic_clevr.py),
extract features from the three image folders (scripts/extract_features.py), build the
vocabulary and label file (scripts/preprocess_captions_transformer.py). The folder gets the
layout of DATA.md, and data_overrides() points a config at it.
"""
import json
import os
import sys

from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RENDER_SIZE = ("128", "96")  # width, height of the rendered images
# Random-weight ResNet-101 features (no ImageNet weights offline) keep shape only in the early
# stages: layer1 on a 112 x 112 input (28 x 28 grid), averaged down to 7 x 7 for CPU speed, plus 18
# channels of colour statistics per cell (--append_color), which random filters keep too weakly to
# tell a changed colour from a changed light. Weighted 3 to 1 against the 256 ResNet channels,
# they let the model learn colour changes in about 800 steps instead of 1,400 (configs/dynamic/
# transformer_demo.yaml says how that was measured).
FEATURE_ARGS = ("--image_height", "112", "--image_width", "112", "--model_stage", "1", "--output_grid", "7",
                "--append_color", "--color_weight", "3")
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


def extract_command(folder, images, features, weights):
    return script("extract_features.py", "--input_image_dir", f"{folder}/{images}", "--output_dir",
                  f"{folder}/{features}", "--batch_size", "50", *FEATURE_ARGS, "--weights", weights)


def preprocess_command(folder):
    return script("preprocess_captions_transformer.py",
                  "--input_captions_json", f"{folder}/change_captions.json",
                  "--input_neg_captions_json", f"{folder}/no_change_captions.json",
                  "--input_image_dir", f"{folder}/images", "--split_json", f"{folder}/splits.json",
                  "--output_vocab_json", f"{folder}/transformer_vocab.json",
                  "--output_h5", f"{folder}/transformer_labels.h5")


def generated(folder):
    return os.path.exists(os.path.join(folder, "scenes.json"))


def extracted(folder, images, features):
    feature_dir = os.path.join(folder, features)
    return os.path.isdir(feature_dir) and len(os.listdir(feature_dir)) >= len(os.listdir(os.path.join(folder, images)))


def preprocessed(folder):
    return os.path.exists(os.path.join(folder, "transformer_labels.h5"))


def imagenet_weights_present():
    """True when torchvision's ResNet-101 ImageNet checkpoint is already in the torch hub cache."""
    import torch
    from torchvision.models import ResNet101_Weights

    file_name = os.path.basename(ResNet101_Weights.IMAGENET1K_V1.url)
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", file_name))


def check_feature_settings(folder, settings, clean_command):
    """Features on disk must come from these extraction settings (an older checkout used others).

    The settings are stamped next to the data before the first feature is written, so an interrupted
    extraction resumes; features without a matching stamp are a UserError naming clean_command.
    """
    stamp = os.path.join(folder, "feature_settings.json")
    found = None
    if os.path.exists(stamp):
        with open(stamp) as handle:
            found = json.load(handle)
    elif not any(os.path.isdir(os.path.join(folder, f)) and os.listdir(os.path.join(folder, f))
                 for _, f in IMAGE_FOLDERS):
        os.makedirs(folder, exist_ok=True)
        with open(stamp, "w") as handle:
            json.dump(settings, handle, indent=1)
        return
    if found != settings:
        raise UserError(f"the features under {folder} were made with other settings ({found or 'unknown'}; "
                        f"these use {settings}). Run `{clean_command}` and start again")


def data_overrides(folder):
    """KEY VALUE config overrides that point every data.* path at ``folder``."""
    pairs = []
    for key, name in DATA_FILES.items():
        pairs += [key, os.path.join(folder, name)]
    return pairs
