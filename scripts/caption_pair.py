"""Caption a pair of your own images with a trained snapshot.

    python scripts/caption_pair.py --cfg configs/dynamic/transformer_quick.yaml --snapshot best \
        BEFORE.png AFTER.png [--attention pair.png] [--beam_size K] [--gpu ID] [KEY VALUE ...]

The two images go through the feature extraction the snapshot was trained on: the settings stored
in the snapshot's config (data.extraction), so nothing is retyped. Images of any size are resized
as the extractor resizes them. Prints the caption (greedy decoding; --beam_size K for beam search);
--attention FILE also draws both images with the encoder's cross-view attention and the decoder's
attention over them.

Random-weight networks (the CPU demo) take their BatchNorm statistics from the first images of the
data's image folder (utils/extraction.py): the before image gets those of data.default_img_dir, the
after image those of the folder it lies in when that is data.semantic_img_dir or
data.nonsemantic_img_dir, else those of data.semantic_img_dir. So a pair of the data set gets the
features its extraction gave, and the caption test.py writes for it.
"""
import argparse
import os
import sys
import textwrap

import matplotlib
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from configs.defaults import ConfigError, get_cfg_defaults, get_key, merge_dict
from models.loading import load_trained_model
from utils.checkpoint import snapshot_path
from utils.cli import int_at_least, parse_with_overrides, report_errors, snapshot_choice, trained_experiment
from utils.dataset import check_feature_shape
from utils.device import autocast_context
from utils.errors import UserError
from utils.eval_utils import classify_caption
from utils.extraction import (BATCH_SIZE, IMAGE_EXTENSIONS, Extractor, describe_settings, list_images,
                              settings_differences, settings_from_config)
from utils.feature_store import FEATURE_SETS, FeatureStore, to_dtype
from utils.figures import attention_maps, show
from utils.synthetic_data import EXTRACT_BATCH
from utils.utils import decode_sequence

matplotlib.use("Agg")  # files only: no display on the training machines
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

BEFORE_SET, CHANGED_SET, DISTRACTOR_SET = FEATURE_SETS
# Random weights: the features do not record the batch size their BatchNorm statistics were measured
# with (a plain average over batches: it matters). These are the sizes the project extracts with, the
# demo's and scripts/extract_features.py's default, tried in turn against the features the data holds
# for the folder's first image.
CALIBRATION_BATCHES = (EXTRACT_BATCH, BATCH_SIZE)
MATCH = 1e-3  # largest difference from the stored features, relative to their largest value (float16 rounding)
FIG_WIDTH = 10.0  # inches: two panels of 5 inches
DPI = 100
TEXT_LINE = 0.34  # inches per caption line
WRAP = 68  # characters per caption line over FIG_WIDTH


class PairError(UserError):
    """Images, snapshot or data that cannot give a caption; the message says what to do."""


def check_image(path, label):
    """PairError unless ``path`` is an image file PIL can read."""
    if not os.path.isfile(path):
        raise PairError(f"{label} image {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, UnidentifiedImageError) as err:
        raise PairError(f"{label} image {path} is not an image that can be read ({err}); give a PNG or JPEG "
                        f"file ({', '.join(IMAGE_EXTENSIONS)})") from None


def stored_settings(cfg, path):
    """The extraction settings of the snapshot at ``path`` (its stored config's data.extraction over the
    defaults; cfg's for a snapshot written before the key existed); PairError when they are not those of cfg:
    the snapshot comes from another config."""
    expected = settings_from_config(cfg.data.extraction)
    # Already loaded and checked by models.loading; mmap reads the config without the weights again.
    stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"].get("data", {})
    if "extraction" not in stored:
        return expected
    node = get_cfg_defaults().data.extraction
    try:
        merge_dict(node, stored["extraction"], f"{path} (its stored config)", "data.extraction.")
    except ConfigError as err:
        raise PairError(str(err)) from None
    settings = settings_from_config(node)
    if settings != expected:
        raise PairError(f"{path} was trained on features of {describe_settings(settings)}, but the config extracts "
                        f"{describe_settings(expected)} (data.extraction: {settings_differences(settings, expected)}): "
                        f"the snapshot comes from another config; pass the --cfg it was trained with")
    return settings


def check_figure_file(path):
    """PairError unless matplotlib can write a figure to ``path`` (judged by its extension; none is PNG)."""
    extension = os.path.splitext(path)[1][1:].lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if extension and extension not in supported:
        raise PairError(f"--attention {path}: matplotlib cannot write .{extension} files; give a .png file (or "
                        f"{', '.join('.' + name for name in sorted(supported) if name != 'png')})")


def _inside(path, folder):
    return os.path.isdir(folder) and os.path.samefile(os.path.dirname(os.path.abspath(path)), folder)


def after_set(cfg, after):
    """The feature set of the after image: the distractor images' when it lies in their folder, else the
    changed images'."""
    return DISTRACTOR_SET if _inside(after, get_key(cfg, DISTRACTOR_SET.image_key)) else CHANGED_SET


class DataFeatures:
    """The features the data holds (folders or store of cfg): float32, or None where it holds none."""

    def __init__(self, cfg):
        self.cfg = cfg
        store = cfg.data.feature_store
        self.store = FeatureStore(store) if store and os.path.isfile(store) else None
        self.dtype = self.store.dtype if self.store is not None else np.dtype(np.float32)

    def read(self, feature_set, image_name):
        if self.store is not None:
            names = self.store.names[feature_set.name]
            if image_name not in names:
                return None
            return self.store.read(feature_set.name, self.store.ids[names.index(image_name)])
        path = os.path.join(get_key(self.cfg, feature_set.feature_key), image_name + ".npy")
        return np.load(path, allow_pickle=False) if os.path.isfile(path) else None


def _matches(found, stored):
    return found.shape == stored.shape and np.abs(found - stored).max() <= MATCH * max(np.abs(stored).max(), 1.0)


def calibrate(extractor, cfg, feature_set, data):
    """Random weights: the BatchNorm statistics of feature_set's image folder, measured as its extraction
    measured them (checked against the data's features of the folder's first image)."""
    folder = get_key(cfg, feature_set.image_key)
    if not os.path.isdir(folder):
        raise PairError(f"the snapshot's features come from a random-weight network whose BatchNorm statistics are "
                        f"measured on the data's images, and {feature_set.image_key} = {folder} does not exist; "
                        f"caption the pair where the data is (or set {feature_set.image_key})")
    first = list_images(folder)[0]
    stored = data.read(feature_set, first)
    for batch in CALIBRATION_BATCHES:
        extractor.calibrate(folder, batch)
        if stored is None or _matches(extractor([os.path.join(folder, first)])[0].numpy(), stored):
            return
    print(f"note: the features of {os.path.join(folder, first)} differ from those the data holds (extracted with "
          f"a batch size other than {', '.join(map(str, CALIBRATION_BATCHES))}?); the caption may differ a little "
          f"from test.py's", file=sys.stderr)


def pair_features(cfg, settings, before, after, device):
    """(before, after) features, (1, C, H, W) float32 on the device, as the data's extraction made them (and
    rounded to the dtype the data stores them in)."""
    extractor = Extractor(settings, device)
    data = DataFeatures(cfg)
    features = []
    for path, feature_set in ((before, BEFORE_SET), (after, after_set(cfg, after))):
        if settings["weights"] == "random":
            calibrate(extractor, cfg, feature_set, data)
        found = to_dtype(extractor([path]).numpy(), data.dtype)
        features.append(torch.from_numpy(to_dtype(found, np.float32)).to(device))
    return features


@torch.no_grad()
def caption_pair(cfg, iteration, before, after, device, beam_size=1):
    """{"caption", "read_as", "maps" (utils.figures.attention_maps), "iteration", "settings"} of the pair."""
    for path, label in ((before, "before"), (after, "after")):
        check_image(path, label)
    model, idx_to_word, model_cfg = load_trained_model(cfg, iteration, device)
    settings = stored_settings(cfg, snapshot_path(cfg, iteration))
    bef, aft = pair_features(model_cfg, settings, before, after, device)
    check_feature_shape(model_cfg, tuple(bef.shape[1:]), f"the extraction ({describe_settings(settings)})")
    with autocast_context(device, model_cfg.train.amp):
        generated = model.generate(bef, aft, beam_size=beam_size)
    caption = decode_sequence(idx_to_word, generated.tokens)[0]
    return {"caption": caption, "read_as": classify_caption(caption), "iteration": iteration, "settings": settings,
            "maps": attention_maps(generated, 0, tuple(bef.shape[-2:]), idx_to_word)}


def draw_pair(result, before, after, path):
    """Both images, then the encoder's and the decoder's attention over them, under the caption; written to
    ``path`` through a temporary file."""
    images = []
    for image_path in (before, after):
        with Image.open(image_path) as img:
            images.append(np.asarray(img.convert("RGB")))
    h, w = images[0].shape[:2]
    panel_h = FIG_WIDTH / 2 * h / w + 0.45  # the image and its title
    lines = textwrap.wrap(f"\"{result['caption']}\"", WRAP)
    text_h = TEXT_LINE * len(lines) + 0.6
    fig_h = 3 * panel_h + text_h
    fig = plt.figure(figsize=(FIG_WIDTH, fig_h), dpi=DPI)
    maps = result["maps"]
    rows = [(("before", None), ("after", None)),
            (("encoder | before: attention from after", maps["enc_before"]),
             ("encoder | after: attention from before", maps["enc_after"])),
            (("decoder | on before", maps["decoder"]), ("decoder | on after", maps["decoder"]))]
    for row, panels in enumerate(rows):
        bottom = fig_h - text_h - panel_h * (row + 1)
        for column, ((title, heat), image) in enumerate(zip(panels, images)):
            ax = fig.add_axes([column / 2 + 0.005, bottom / fig_h, 1 / 2 - 0.01, (panel_h - 0.45) / fig_h])
            show(ax, image, title, heat=heat)
    for i, line in enumerate(lines):
        fig.text(0.01, 1 - (0.15 + i * TEXT_LINE) / fig_h, line, fontsize=16, weight="bold", va="top")
    fig.text(0.01, 1 - (0.2 + len(lines) * TEXT_LINE) / fig_h,
             f"snapshot {result['iteration']}; features: {describe_settings(result['settings'])}", fontsize=11,
             color="#444444", va="top")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base, extension = os.path.splitext(path)
    tmp = f"{base}.tmp{extension or '.png'}"
    try:
        fig.savefig(tmp, dpi=DPI)
    finally:
        plt.close(fig)
    os.replace(tmp, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="the config the snapshot was trained with")
    parser.add_argument("--snapshot", type=snapshot_choice, required=True,
                        help="iteration of the snapshot, best (highest validation CIDEr) or last")
    parser.add_argument("before", help="the before image (PNG or JPEG, any size)")
    parser.add_argument("after", help="the after image")
    parser.add_argument("--attention", metavar="FILE", default=None,
                        help="also draw both images with the attention maps into FILE (e.g. pair.png)")
    parser.add_argument("--beam_size", type=int_at_least(1), default=1, help="1 is greedy decoding")
    parser.add_argument("--gpu", type=int_at_least(-1), default=None, help="CUDA device id; -1 for the CPU")
    return parse_with_overrides(parser, argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)

    def run():
        if args.attention:
            check_figure_file(args.attention)
        cfg, device, iteration = trained_experiment(args, "scripts/caption_pair.py", argv)
        result = caption_pair(cfg, iteration, args.before, args.after, device, args.beam_size)
        if args.attention:
            draw_pair(result, args.before, args.after, args.attention)
        return result

    result = report_errors(run)
    read_as = (result["read_as"] or "no change type").replace("_", " ")
    print(f"snapshot {result['iteration']}, read as: {read_as}")
    if args.attention:
        print(f"attention maps: {args.attention}")
    print(f"caption: {result['caption']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
