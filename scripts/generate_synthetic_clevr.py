"""Synthetic CLEVR-Change: renders (before, semantic change, distractor) triplets with numpy.

Writes the layout of DATA.md section 1 under --output_dir (images/, sc_images/, nsc_images/,
change_captions.json, no_change_captions.json, splits.json, type_mapping.json,
total_change_captions_reformat.json) plus scenes.json with the ground truth of every scene.
The generator itself is the package utils/synthetic/ (rendering, scenes, captions, writing).

    python scripts/generate_synthetic_clevr.py --output_dir data/synthetic --num_scenes 2000 \
        --width 160 --height 120
"""
import argparse
import os
import sys
import time

from utils.synthetic.render import SUPERSAMPLE
from utils.synthetic.writing import generate, preview
from utils.text import CHANGE_TYPES


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True, help="root of the data layout to write")
    parser.add_argument("--num_scenes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="processes (default: all cores); the output does not depend on it")
    parser.add_argument("--start_id", type=int, default=0, help="id of the first scene")
    parser.add_argument("--supersample", type=int, default=SUPERSAMPLE,
                        help="rays per pixel along each axis (anti-aliasing)")
    parser.add_argument("--viewpoint_shift", type=float, default=1.0,
                        help="scale of the camera and light change of the changed and distractor images "
                             "(1: default; 2: twice as strong distractors)")
    parser.add_argument("--preview", metavar="PNG",
                        help="also write a sheet of a few triplets (one per change type) here")
    args = parser.parse_args(argv)
    try:
        start = time.time()
        records = generate(args.output_dir, args.num_scenes, args.seed, args.width, args.height,
                           args.workers, args.start_id, args.supersample, viewpoint_shift=args.viewpoint_shift)
        elapsed = time.time() - start
        print(f"{len(records)} scenes ({3 * len(records)} images of {args.width}x{args.height}) "
              f"in {elapsed:.1f} s: {3 * len(records) / elapsed:.1f} images/s with "
              f"{args.workers} workers -> {args.output_dir}")
        if args.preview:
            step = args.num_scenes // len(CHANGE_TYPES)
            ids = [args.start_id + k * step for k in range(len(CHANGE_TYPES))]
            preview(args.output_dir, args.preview, ids)
            print(f"preview: {args.preview}")
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
