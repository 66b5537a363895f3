"""ResNet grid features of images: the network of one extraction setting, and folders of .npy files.

The settings are the config group ``data.extraction`` (configs/defaults.py), kept as a plain dict:
the reference's are ResNet-101 with ImageNet weights cut after layer3, on images resized (bicubic)
to 224 x 224, scaled to [0, 1] and normalised with mean (0.485, 0.456, 0.406) and std
(0.229, 0.224, 0.224). Every feature folder and feature store records the settings it was made
with (``extraction.json`` in a folder), so the loader can tell features of another setting.

Random weights (no ImageNet checkpoint offline) get BatchNorm statistics re-estimated on the first
images of the sorted folder, so their activations stay in a sane range; --append_color adds 18
channels of colour statistics per cell (see color_channels), which random filters keep too weakly.
"""
import io
import json
import os
import time

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from utils.errors import UserError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.224)  # the reference's blue std (torchvision's is 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
BATCH_SIZE = 128  # images per extraction batch unless told (scripts/extract_features.py --batch_size)
BN_SAMPLE = 256  # images used to re-estimate BatchNorm statistics of a random network
STAMP = "extraction.json"  # the settings of a feature folder, inside it


class ExtractError(UserError):
    """Unusable input or weights; the message says what to do."""


def settings_from_config(node):
    """The extraction settings of a config's ``data.extraction`` node, as a plain dict."""
    return {"model": node.model, "stage": node.stage, "image_size": list(node.image_size),
            "weights": node.weights, "seed": node.seed, "output_grid": list(node.output_grid),
            "append_color": node.append_color, "color_weight": float(node.color_weight)}


def describe_settings(settings):
    """One line for messages: 'resnet101 layer3, 224x224, imagenet weights'."""
    text = (f"{settings['model']} layer{settings['stage']}, {'x'.join(map(str, settings['image_size']))}, "
            f"{settings['weights']} weights")
    if settings["weights"] == "random":
        text += f" (seed {settings['seed']})"
    if settings["output_grid"]:
        text += f", pooled to {'x'.join(map(str, settings['output_grid']))}"
    if settings["append_color"]:
        text += f", colour channels x{settings['color_weight']:g}"
    return text


def settings_differences(found, expected):
    """'stage 1 (the config: 3), ...' for the keys where two settings dicts differ; '' when equal."""
    keys = sorted(set(found) | set(expected))
    return ", ".join(f"{key} {found.get(key)!r} (the config: {expected.get(key)!r})"
                     for key in keys if found.get(key) != expected.get(key))


def read_stamp(folder):
    """The settings recorded in a feature folder, or None when it has no stamp."""
    path = os.path.join(folder, STAMP)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        raise ExtractError(f"{path} cannot be read ({err}); delete it if the folder's features are "
                           f"yours, or re-extract the folder") from None


def list_images(image_dir, max_images=-1):
    if not os.path.isdir(image_dir):
        raise ExtractError(f"image folder {image_dir} does not exist; unpack the data "
                           f"(tar -xzf clevr_change.tar.gz) or generate it with "
                           f"scripts/generate_synthetic_clevr.py")
    names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ExtractError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
    return names[:max_images] if max_images >= 0 else names


def load_image(path, height, width):
    """(3, H, W) float32 tensor, resized bicubic, normalised."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((width, height), Image.BICUBIC)
    except (OSError, UnidentifiedImageError) as err:
        raise ExtractError(f"cannot read image {path}: {err}") from None
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def _imagenet_state_dict(model_name):
    import torchvision

    weights = torchvision.models.get_model_weights(model_name).IMAGENET1K_V1
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return weights.get_state_dict(progress=True)
    except Exception as err:  # no network, proxy refusal, truncated file, ...
        raise ExtractError(
            f"could not load the ImageNet weights of {model_name} ({type(err).__name__}: {err}). "
            f"Download {weights.url} on a machine with internet access and copy it to {target}, "
            f"or pass --weights PATH_TO_STATE_DICT, or --weights random (a seeded random "
            f"network: fine for tests and demos, not for real results)") from None


def build_model(model_name="resnet101", stage=3, weights="imagenet", seed=0):
    """The ResNet trunk up to layer<stage>, in eval mode (BatchNorm not yet calibrated)."""
    import torchvision  # imported here: the loader reads settings from this module without the networks

    if not 1 <= stage <= 4:
        raise ExtractError(f"--model_stage must be 1..4, got {stage}")
    try:
        torch.manual_seed(seed)
        net = torchvision.models.get_model(model_name, weights=None)
    except ValueError as err:
        raise ExtractError(f"unknown --model {model_name}: {err}") from None
    if weights == "imagenet":
        net.load_state_dict(_imagenet_state_dict(model_name))
    elif weights != "random":
        if not os.path.isfile(weights):
            raise ExtractError(f"--weights {weights}: no such file (use imagenet, random or the "
                               f"path of a {model_name} state dict)")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise ExtractError(f"--weights {weights} is not a {model_name} state dict: "
                               f"{str(err).splitlines()[0]}") from None
    layers = [net.conv1, net.bn1, net.relu, net.maxpool]
    layers += [getattr(net, f"layer{k}") for k in range(1, stage + 1)]
    return torch.nn.Sequential(*layers).eval()


@torch.no_grad()
def calibrate_batchnorm(model, batches):
    """Re-estimates BatchNorm running statistics as a plain average over ``batches``.

    A randomly initialised ResNet in eval mode has mean 0 / var 1 statistics, so activations
    grow layer after layer (std ~1e4 after layer3); measured statistics keep them near 1.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for batch in batches:
        model(batch)
    model.eval()


def color_channels(images, grid, weight=1.0):
    """Eighteen colour statistics per cell of a (height, width) grid, from normalised images (B, 3, H, W).

    The mean and the standard deviation of the normalised RGB values (shading, highlights of metal),
    and the mean chromaticity r/(r+g+b) ... of each quarter of the cell (3 x 4 channels), which a
    change of light leaves as it is but a change of colour does not; quarters, because a small object
    fills a quarter of a cell better than the whole. Scaled to a spread of about 1 over CLEVR-like
    scenes (mostly grey: chromaticity varies by about 0.035 around 1/3), as the ResNet channels have,
    then multiplied by ``weight``.
    """
    pool = torch.nn.functional.adaptive_avg_pool2d
    height, width = grid
    rgb = images * torch.tensor(STD, device=images.device).view(1, 3, 1, 1) \
        + torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)  # (B, 3, H, W) in [0, 1]
    chromaticity = rgb / rgb.sum(dim=1, keepdim=True).clamp_min(1e-3)  # (B, 3, H, W)
    quarters = torch.nn.functional.pixel_unshuffle(pool(chromaticity, (2 * height, 2 * width)), 2)  # (B, 12, h, w)
    mean = pool(images, grid)  # (B, 3, h, w)
    std = (pool(images * images, grid) - mean * mean).clamp_min(0).sqrt()
    return weight * torch.cat([mean * 3, std * 3, (quarters - 1 / 3) * 30], dim=1)  # (B, 18, h, w)


class Extractor:
    """The network of one extraction setting on a device: image files in, float32 features out."""

    def __init__(self, settings, device):
        self.settings = settings
        self.device = torch.device(device)
        self.height, self.width = settings["image_size"]
        self.model = build_model(settings["model"], settings["stage"], settings["weights"],
                                 settings["seed"]).to(self.device)

    def load(self, paths):
        return torch.stack([load_image(path, self.height, self.width) for path in paths]).to(self.device)

    def calibrate(self, image_dir, batch_size):
        """Random weights only: BatchNorm statistics from the first images of the whole sorted folder,
        so that a resumed extraction, or one of a subset, uses the statistics of a complete one."""
        if self.settings["weights"] != "random":
            return
        sample = [os.path.join(image_dir, name) for name in list_images(image_dir)[:BN_SAMPLE]]
        calibrate_batchnorm(self.model, (self.load(sample[i:i + batch_size])
                                         for i in range(0, len(sample), batch_size)))

    @torch.no_grad()
    def __call__(self, paths):
        """Features of the image files ``paths``: float32 (B, C, h, w) on the CPU."""
        batch = self.load(paths)
        feats = self.model(batch)
        if self.settings["output_grid"]:
            feats = torch.nn.functional.adaptive_avg_pool2d(feats, tuple(self.settings["output_grid"]))
        if self.settings["append_color"]:
            colors = color_channels(batch, feats.shape[-2:], self.settings["color_weight"])
            feats = torch.cat([feats, colors.to(feats.dtype)], dim=1)
        return feats.float().cpu()


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _save_npy(array, path):
    buf = io.BytesIO()
    np.save(buf, array)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getbuffer())
    os.replace(tmp, path)


def _stamp_folder(output_dir, settings, has_features):
    """Records the settings in the folder; refuses to add features of other settings to it."""
    found = read_stamp(output_dir)
    if found is not None and found != settings:
        raise ExtractError(f"{output_dir} holds features extracted with other settings "
                           f"({describe_settings(found)}; asked for {describe_settings(settings)}): "
                           f"give another --output_dir, or delete {output_dir} to extract it again")
    if found is None and has_features:
        print(f"note: {output_dir} holds features without {STAMP}; adding to them without checking "
              f"their settings")
        return
    if found is None:
        with open(os.path.join(output_dir, STAMP + ".tmp"), "w") as handle:
            json.dump(settings, handle, indent=1)
        os.replace(os.path.join(output_dir, STAMP + ".tmp"), os.path.join(output_dir, STAMP))


def extract(input_image_dir, output_dir, settings, batch_size=BATCH_SIZE, max_images=-1, device=None, progress=True):
    """Writes ``<image name>.npy`` for every image not yet done; returns a dict of figures for the report."""
    names = list_images(input_image_dir, max_images)
    os.makedirs(output_dir, exist_ok=True)
    done = {n for n in os.listdir(output_dir) if n.endswith(".npy")}
    _stamp_folder(output_dir, settings, bool(done))
    todo = [n for n in names if n + ".npy" not in done]
    stats = {"images": len(names), "skipped": len(names) - len(todo), "written": 0}
    if not todo:
        return stats
    extractor = Extractor(settings, device or default_device())
    extractor.calibrate(input_image_dir, batch_size)
    start = time.time()
    total, total_sq, count = 0.0, 0.0, 0
    bar = tqdm(total=len(todo), desc=f"features {os.path.basename(output_dir.rstrip('/'))}",
               unit="img", disable=not progress)
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        feats = extractor([os.path.join(input_image_dir, n) for n in chunk])
        total += feats.sum().item()
        total_sq += feats.double().pow(2).sum().item()
        count += feats.numel()
        for name, feat in zip(chunk, feats.numpy()):
            _save_npy(np.ascontiguousarray(feat, dtype=np.float32), os.path.join(output_dir, name + ".npy"))
        bar.update(len(chunk))
    bar.close()
    elapsed = time.time() - start
    mean = total / count
    stats.update(written=len(todo), seconds=elapsed, images_per_s=len(todo) / elapsed,
                 shape=tuple(feats.shape[1:]), mean=mean,
                 std=float(np.sqrt(max(total_sq / count - mean * mean, 0.0))),
                 device=str(extractor.device))
    return stats
