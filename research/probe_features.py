"""Which object attributes do the features of one extraction setting keep? A linear probe per attribute.

    python research/probe_features.py --cfg configs/dynamic/transformer_demo.yaml [--scenes 800]
                                      [--features DIR] [KEY VALUE ...]

For the "before" image of the first --scenes scenes of a synthetic data set (its scenes.json, next to
the config's data.anno_json), it extracts the features with the config's data.extraction settings
(override them, e.g. `data.extraction.image_size "(160, 160)"`), or reads them from --features DIR,
takes the feature vector of the grid cell under the centre of each visible object's box, and fits a
multinomial logistic regression per attribute (size, colour, material, shape) on the objects of the
first 80 % of the scenes. It prints the accuracy on the objects of the other 20 % beside the share of
their most frequent value. A cell may hold parts of other objects too, as it does for the model.
docs/data.md uses it to choose the demo's features.
"""
import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from configs.defaults import load_config
from utils.cli import int_at_least, parse_with_overrides, report_errors
from utils.errors import UserError
from utils.clevr_objects import ATTRIBUTES
from utils.extraction import Extractor, describe_settings, settings_from_config
from utils.object_score import SCENES_FILE, read_scenes, scenes_beside
from utils.synthetic_data import EXTRACT_BATCH

TRAIN_SHARE = 0.8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="the config whose data set and extraction settings to probe")
    parser.add_argument("--scenes", type=int_at_least(10), default=800, help="the first N scenes of scenes.json")
    parser.add_argument("--features", default=None,
                        help="a folder of extracted features of the default images (<image>.npy) instead of extracting")
    return parse_with_overrides(parser, argv)


def object_cells(scenes, image_size, grid):
    """[(scene index, row, column, {attribute: value})] for each object visible in the default view."""
    width, height = image_size
    rows, cols = grid
    found = []
    for index, scene in enumerate(scenes):
        for obj in scene["objects"]:
            box = obj["boxes"]["default"]
            if box is None:  # added later: not in the "before" image
                continue
            x, y = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
            found.append((index, min(int(y * rows), rows - 1), min(int(x * cols), cols - 1),
                          {a: obj[a] for a in ATTRIBUTES}))
    return found


def fit_and_score(x, labels, train):
    """Held-out accuracy of an L2-regularised multinomial logistic regression (LBFGS) on standardised x."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    linear = torch.nn.Linear(x.shape[1], len(classes))
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x[train]), y[train]) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        accuracy = (linear(x[~train]).argmax(1) == y[~train]).float().mean().item()
    majority = (y[~train] == y[train].mode().values).float().mean().item()
    return accuracy, majority


def load_features(cfg, scenes, folder):
    """(S, C, h, w) features of the scenes' default images: read from ``folder`` or extracted."""
    image_dir = cfg.data.default_img_dir
    names = [scene["images"]["default"] for scene in scenes]
    if folder is not None:
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n + ".npy"))]
        if missing:
            raise UserError(f"--features {folder} lacks {len(missing)} of the {len(names)} images' features "
                            f"(e.g. {missing[0]}.npy); extract them, or leave --features out")
        return torch.stack([torch.from_numpy(np.load(os.path.join(folder, n + ".npy"))) for n in names])
    extractor = Extractor(settings_from_config(cfg.data.extraction), "cpu")
    extractor.calibrate(image_dir, EXTRACT_BATCH)
    paths = [os.path.join(image_dir, n) for n in names]
    return torch.cat([extractor(paths[i:i + EXTRACT_BATCH]) for i in range(0, len(paths), EXTRACT_BATCH)])


def main(argv=None):
    args = parse_args(argv)

    def run():
        cfg = load_config(args.cfg, args.opts, gpu_id=-1)
        scenes_path = scenes_beside(cfg.data.anno_json)
        if scenes_path is None:
            raise UserError(f"no {SCENES_FILE} next to data.anno_json ({cfg.data.anno_json}): the probe needs "
                            f"a synthetic data set (scripts/generate_synthetic_clevr.py writes one)")
        scenes = read_scenes(scenes_path)[:args.scenes]
        with Image.open(os.path.join(cfg.data.default_img_dir, scenes[0]["images"]["default"])) as image:
            image_size = image.size
        features = load_features(cfg, scenes, args.features)  # (S, C, h, w)
        cells = object_cells(scenes, image_size, features.shape[-2:])
        x = torch.stack([features[s, :, r, c] for s, r, c, _ in cells]).float()  # (objects, C)
        train = torch.tensor([s < TRAIN_SHARE * len(scenes) for s, *_ in cells])
        source = args.features or describe_settings(settings_from_config(cfg.data.extraction))
        print(f"{source}: {x.shape[1]} channels, {features.shape[-2]}x{features.shape[-1]} cells; "
              f"{int(train.sum())} training / {int((~train).sum())} held-out objects of {len(scenes)} scenes")
        for attribute in ATTRIBUTES:
            accuracy, majority = fit_and_score(x, [found[attribute] for *_, found in cells], train)
            print(f"  {attribute:8s} {accuracy:.2f} (most frequent value: {majority:.2f})")

    report_errors(run)


if __name__ == "__main__":
    main()
