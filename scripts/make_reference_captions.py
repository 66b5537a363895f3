"""Build the evaluation ground truth total_change_captions_reformat.json from the two caption files.

    python scripts/make_reference_captions.py --input_captions_json ./data/change_captions.json \
        --input_neg_captions_json ./data/no_change_captions.json \
        --output_json ./data/total_change_captions_reformat.json

For a download that lacks it. The file is COCO caption ground truth (DATA.md): image "000123.png"
holds the change captions of CLEVR_default_000123.png, "000123.png_n" its no-change captions;
annotations are {"caption", "id", "image_id"}. evaluate.py and train.py's validation read it.
"""
import argparse
import sys

from utils.cli import report_errors
from utils.errors import UserError
from utils.eval_utils import build_references
from utils.fileio import read_json, write_json_atomic


def make_reference_captions(captions_json, neg_captions_json, output_json):
    sources = []
    for path in (captions_json, neg_captions_json):
        data = read_json(path, "caption file")
        if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(c, str) for c in v)
                                                 for v in data.values()):
            raise UserError(f"{path} must map image file names to lists of caption strings, e.g. "
                            f'{{"CLEVR_default_000123.png": ["the cube moved", ...]}}')
        sources.append(data)
    coco = build_references(*sources, "CLEVR-Change change and no-change captions "
                                      "(scripts/make_reference_captions.py)")
    write_json_atomic(output_json, coco, indent=None)
    return coco


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_captions_json", required=True, help="change captions, e.g. data/change_captions.json")
    parser.add_argument("--input_neg_captions_json", required=True,
                        help="no-change captions, e.g. data/no_change_captions.json")
    parser.add_argument("--output_json", required=True, help="e.g. data/total_change_captions_reformat.json")
    args = parser.parse_args(argv)
    coco = report_errors(make_reference_captions, args.input_captions_json, args.input_neg_captions_json,
                         args.output_json)
    print(f"wrote {args.output_json}: {len(coco['images'])} images, {len(coco['annotations'])} captions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
