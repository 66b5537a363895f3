"""Extracts ResNet grid features, one ``<image file name>.npy`` (float32, C x H x W) per image.

    python scripts/extract_features.py --input_image_dir ./data/images \\
        --output_dir ./data/features --batch_size 128

The defaults are the reference's settings (configs/defaults.py, data.extraction): ResNet-101 with
ImageNet weights cut after layer3, images resized (bicubic) to 224 x 224 and normalised as the
reference script does. --cfg FILE takes the settings of a config instead (the CPU demo's, say).
Existing outputs are skipped, so an interrupted run resumes; every file is written to a temporary
name first and then renamed; the settings go to ``extraction.json`` in the output folder, and a
folder of other settings is refused.

--weights imagenet needs torchvision's checkpoint (downloaded once, or copied by hand into the
torch hub cache); --weights random uses a seeded random network whose BatchNorm statistics are
re-estimated on the input images, so its activations stay in a sane range.

--append_color adds 18 channels of colour statistics per grid cell: random networks keep little
colour, so the CPU demo, which cannot download ImageNet weights, uses them.
"""
import argparse

from configs.defaults import get_cfg_defaults, load_config
from utils.cli import int_at_least, number_at_least, parse_grid, report_errors
from utils.extraction import BATCH_SIZE, extract, settings_from_config


def parse_args(argv=None):
    defaults = get_cfg_defaults().data.extraction
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input_image_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int_at_least(1), default=BATCH_SIZE)
    parser.add_argument("--max_images", type=int_at_least(-1), default=-1, help="first N images; -1 all")
    parser.add_argument("--cfg", default=None,
                        help="take the settings from this config's data.extraction (the flags below are then ignored)")
    parser.add_argument("--image_height", type=int_at_least(1), default=defaults.image_size[0])
    parser.add_argument("--image_width", type=int_at_least(1), default=defaults.image_size[1])
    parser.add_argument("--model", default=defaults.model, help="a torchvision ResNet name")
    parser.add_argument("--model_stage", type=int_at_least(1), default=defaults.stage, help="keep layers up to layerN (1-4)")
    parser.add_argument("--weights", default=defaults.weights,
                        help="imagenet (torchvision checkpoint), random (seeded, BatchNorm "
                             "re-estimated on the images) or the path of a state dict")
    parser.add_argument("--seed", type=int_at_least(0), default=defaults.seed)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    parser.add_argument("--output_grid", type=parse_grid, default=None,
                        help="average-pool the grid to N or HxW (small grids for CPU demos)")
    parser.add_argument("--append_color", action="store_true",
                        help="append 18 channels of colour statistics per grid cell (C grows by 18)")
    parser.add_argument("--color_weight", type=number_at_least(0), default=defaults.color_weight,
                        help="multiply the --append_color channels by this (the CPU demo uses 3)")
    return parser.parse_args(argv)


def settings_of(args):
    """The extraction settings: the config's data.extraction, or the flags checked as the config checks them."""
    if args.cfg is not None:
        return settings_from_config(load_config(args.cfg).data.extraction)
    flags = ["data.extraction.model", args.model, "data.extraction.stage", str(args.model_stage),
             "data.extraction.image_size", str((args.image_height, args.image_width)),
             "data.extraction.weights", args.weights, "data.extraction.seed", str(args.seed),
             "data.extraction.output_grid", str(tuple(args.output_grid or ())),
             "data.extraction.append_color", str(args.append_color),
             "data.extraction.color_weight", str(args.color_weight)]
    return settings_from_config(load_config(None, flags).data.extraction)


def main(argv=None):
    args = parse_args(argv)

    def run():
        stats = extract(args.input_image_dir, args.output_dir, settings_of(args), args.batch_size,
                        args.max_images, args.device)
        if not stats["written"]:
            print(f"all {stats['images']} feature files already exist in {args.output_dir}")
            return
        print(f"{stats['written']} images ({stats['skipped']} already done) -> {args.output_dir}: "
              f"features {stats['shape']} float32, mean {stats['mean']:.3f} std {stats['std']:.3f}; "
              f"{stats['seconds']:.1f} s, {stats['images_per_s']:.1f} images/s on {stats['device']}")

    report_errors(run)


if __name__ == "__main__":
    main()
