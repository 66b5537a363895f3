"""Packs the features a run needs into one feature store (HDF5; float16 unless --dtype float32).

    python scripts/pack_features.py --cfg configs/dynamic/transformer_quick.yaml --from_archive clevr_change_features.tar.gz
    python scripts/pack_features.py --cfg configs/dynamic/transformer_quick.yaml --from_folders data
    python scripts/pack_features.py --cfg configs/dynamic/transformer_quick.yaml --from_images data --device cuda

Which scene ids: those the config uses (its training subset after data.train.max_samples and
data.subset_seed, its validation and test splits or subsets), of the --splits given (all three by
default); without --cfg, every id of data/splits.json. Where: the config's data.feature_store, or --output. Where from, one of:
  --from_archive FILE   the features archive read as a stream (.tar.gz or .tar), never unpacked to disk;
                        members features/..., sc_features/..., nsc_features/... (under one leading folder or not)
  --from_folders DIR    the three feature folders under DIR (features, sc_features, nsc_features)
  --from_images DIR     the three image folders under DIR (images, sc_images, nsc_images); the features are
                        extracted with the config's data.extraction settings (use a GPU: --device cuda)
KEY VALUE pairs override the config, as for train.py.

Before it writes it prints the space the store needs and stops when the disk has less. It works on
<store>.partial: an interrupted pack (Ctrl-C, a full disk, a lost connection) resumes when the same
command runs again, and packing for a config that needs more ids adds them to an existing store. At
the end it checks every image (count, shape, finite values) and renames the store to its name.
"""
import argparse
import shlex
import sys

from configs.defaults import load_config
from utils.cli import int_at_least, parse_with_overrides, report_errors
from utils.dataset import SPLITS
from utils.packing import PackError, pack_store


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default=None, help="pack the scene ids this config uses (default: every id)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from_archive", metavar="FILE", help="clevr_change_features.tar.gz (or .tar), read as a stream")
    source.add_argument("--from_folders", metavar="DIR", help="DIR/features, DIR/sc_features, DIR/nsc_features")
    source.add_argument("--from_images", metavar="DIR", help="DIR/images, DIR/sc_images, DIR/nsc_images")
    parser.add_argument("--output", default=None, help="the store's file (default: the config's data.feature_store)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="float16 halves the size; float32 keeps the features exactly")
    parser.add_argument("--batch_size", type=int_at_least(1), default=128, help="images per batch (--from_images)")
    parser.add_argument("--device", default=None, help="--from_images: cpu, cuda, cuda:1 (default: cuda if present)")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                        help="pack the ids of these splits only (default: train val test); a run reads the ids of "
                             "the splits it uses, so e.g. a store of the test split can be packed when it is needed")
    return parse_with_overrides(parser, argv)


def output_path(args, cfg):
    if args.output:
        return args.output
    if cfg.data.feature_store:
        return cfg.data.feature_store
    raise PackError(f"{args.cfg or 'the default config'} sets no data.feature_store: give the store's file with "
                    f"--output FILE (then train with data.feature_store FILE)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)

    def run():
        cfg = load_config(args.cfg, args.opts)
        source = (("archive", args.from_archive) if args.from_archive else
                  ("folders", args.from_folders) if args.from_folders else ("images", args.from_images))
        command = " ".join(["python scripts/pack_features.py"] + [shlex.quote(a) for a in argv])
        print(pack_store(cfg, output_path(args, cfg), source, args.dtype, command, args.batch_size, args.device,
                         args.splits))

    report_errors(run)


if __name__ == "__main__":
    main()
