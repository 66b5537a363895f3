"""Extracts ResNet grid features, one ``<image file name>.npy`` (float32, C x H x W) per image.

    python scripts/extract_features.py --input_image_dir ./data/images \
        --output_dir ./data/features --batch_size 128

Images are resized (bicubic) to --image_height x --image_width, scaled to [0, 1] and normalised
with mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.224) as the reference script does; the
network is cut after layer<--model_stage>. Existing outputs are skipped, so an interrupted run
resumes; every file is written to a temporary name first and then renamed.

--weights imagenet needs torchvision's checkpoint (downloaded once, or copied by hand into the
torch hub cache); --weights random uses a seeded random network whose BatchNorm statistics are
re-estimated on the input images, so its activations stay in a sane range.

--append_color adds 18 channels of colour statistics per grid cell (see color_channels): random
networks keep little colour, so the CPU demo, which cannot download ImageNet weights, uses them.
"""
import argparse
import io
import os
import sys
import time

import numpy as np
import torch
import torchvision
from PIL import Image
from tqdm import tqdm

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.224)  # the reference's blue std (torchvision's is 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
BN_SAMPLE = 256  # images used to re-estimate BatchNorm statistics of a random network


class ExtractError(Exception):
    """Unusable input or weights; the message says what to do."""


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
    except OSError as err:
        raise ExtractError(f"cannot read image {path}: {err}") from None
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def _imagenet_state_dict(model_name):
    weights = torchvision.models.get_model_weights(model_name).IMAGENET1K_V1
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return weights.get_state_dict(progress=True)
    except Exception as err:  # no network, proxy refusal, truncated file, ...
        raise ExtractError(
            f"could not load the ImageNet weights of {model_name} ({type(err).__name__}: {err}).\n"
            f"Download {weights.url} on a machine with internet access and copy it to\n"
            f"  {target}\n"
            f"or pass --weights PATH_TO_STATE_DICT, or --weights random (a seeded random "
            f"network: fine for tests and demos, not for real results).") from None


def build_model(model_name="resnet101", stage=3, weights="imagenet", seed=0):
    """The ResNet trunk up to layer<stage>, in eval mode (BatchNorm not yet calibrated)."""
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


def _save_npy(array, path):
    buf = io.BytesIO()
    np.save(buf, array)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getbuffer())
    os.replace(tmp, path)


def parse_grid(text):
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ExtractError(f"--output_grid must look like 7 or 7x7, got {text}") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise ExtractError(f"--output_grid must look like 7 or 7x7, got {text}")
    return tuple(sizes)


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


def extract(input_image_dir, output_dir, batch_size=128, max_images=-1, image_height=224,
            image_width=224, model_name="resnet101", model_stage=3, weights="imagenet", seed=0,
            device=None, output_grid=None, append_color=False, progress=True, color_weight=1.0):
    """Writes features of every image not yet done; returns a dict of figures for the report."""
    names = list_images(input_image_dir, max_images)
    os.makedirs(output_dir, exist_ok=True)
    todo = [n for n in names if not os.path.exists(os.path.join(output_dir, n + ".npy"))]
    stats = {"images": len(names), "skipped": len(names) - len(todo), "written": 0}
    if not todo:
        return stats
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(model_name, model_stage, weights, seed)
    if weights == "random":
        # Calibrate on the first images of the whole sorted list, so that a resumed run uses
        # the same statistics as an uninterrupted one.
        sample = names[:BN_SAMPLE]
        model.to(device)
        calibrate_batchnorm(model, (torch.stack([
            load_image(os.path.join(input_image_dir, n), image_height, image_width)
            for n in sample[i:i + batch_size]]).to(device)
            for i in range(0, len(sample), batch_size)))
    model.to(device)
    start = time.time()
    total, total_sq, count = 0.0, 0.0, 0
    bar = tqdm(total=len(todo), desc=f"features {os.path.basename(output_dir.rstrip('/'))}",
               unit="img", disable=not progress)
    with torch.no_grad():
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            batch = torch.stack([load_image(os.path.join(input_image_dir, n), image_height,
                                            image_width) for n in chunk]).to(device)
            feats = model(batch)
            if output_grid is not None:
                feats = torch.nn.functional.adaptive_avg_pool2d(feats, output_grid)
            if append_color:
                colors = color_channels(batch, feats.shape[-2:], color_weight)
                feats = torch.cat([feats, colors.to(feats.dtype)], dim=1)
            feats = feats.float().cpu()
            total += feats.sum().item()
            total_sq += feats.double().pow(2).sum().item()
            count += feats.numel()
            for name, feat in zip(chunk, feats.numpy()):
                _save_npy(np.ascontiguousarray(feat, dtype=np.float32),
                          os.path.join(output_dir, name + ".npy"))
            bar.update(len(chunk))
    bar.close()
    elapsed = time.time() - start
    mean = total / count
    stats.update(written=len(todo), seconds=elapsed, images_per_s=len(todo) / elapsed,
                 shape=tuple(feats.shape[1:]), mean=mean,
                 std=float(np.sqrt(max(total_sq / count - mean * mean, 0.0))),
                 device=str(device))
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input_image_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--max_images", type=int, default=-1, help="first N images; -1 all")
    parser.add_argument("--image_height", type=int, default=224)
    parser.add_argument("--image_width", type=int, default=224)
    parser.add_argument("--model", default="resnet101", help="a torchvision ResNet name")
    parser.add_argument("--model_stage", type=int, default=3, help="keep layers up to layerN")
    parser.add_argument("--weights", default="imagenet",
                        help="imagenet (torchvision checkpoint), random (seeded, BatchNorm "
                             "re-estimated on the images) or the path of a state dict")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    parser.add_argument("--output_grid", default=None,
                        help="average-pool the grid to N or HxW (small grids for CPU demos)")
    parser.add_argument("--append_color", action="store_true",
                        help="append 18 channels of colour statistics per grid cell (C grows by 18)")
    parser.add_argument("--color_weight", type=float, default=1.0,
                        help="multiply the --append_color channels by this (the CPU demo uses 3)")
    args = parser.parse_args(argv)
    try:
        stats = extract(args.input_image_dir, args.output_dir, args.batch_size, args.max_images,
                        args.image_height, args.image_width, args.model, args.model_stage,
                        args.weights, args.seed, args.device, parse_grid(args.output_grid),
                        args.append_color, color_weight=args.color_weight)
    except ExtractError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if not stats["written"]:
        print(f"all {stats['images']} feature files already exist in {args.output_dir}")
        return
    print(f"{stats['written']} images ({stats['skipped']} already done) -> {args.output_dir}: "
          f"features {stats['shape']} float32, mean {stats['mean']:.3f} std {stats['std']:.3f}; "
          f"{stats['seconds']:.1f} s, {stats['images_per_s']:.1f} images/s on {stats['device']}")


if __name__ == "__main__":
    main()
