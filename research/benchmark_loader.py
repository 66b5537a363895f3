"""How fast features of the real size load from this disk: loose .npy files against the feature store.

    python research/benchmark_loader.py --scratch DIR [--scenes 2000] [--cfg configs/dynamic/transformer_quick.yaml]
                                       [--archive] [--workers 0 2 4] [--keep]

Writes --scenes scenes of distinct feature files of the config's shape (1024 x 14 x 14 float32 for the
real configs; random ReLU-like values, half of them zero, as layer3 features are) into DIR in the real
layout, packs them into a float16 and a float32 store with scripts/pack_features.py's code (with
--archive, also into a .tar.gz first, and packs the float16 store from it as a stream), then times the
loader on each layout as `python -m utils.dataset --benchmark` does: cold page cache and warm, with
0, 2 and 4 worker processes. It prints the sizes, the packing speeds, the loader table and what the
quick and full stores would take. DIR needs about 5 MB per scene (10 MB with --archive); it is deleted
at the end unless --keep. Distinct files, because hard links to one file would be read from memory.
"""
import argparse
import json
import os
import shutil
import sys
import tarfile
import time

import numpy as np

from configs.defaults import load_config
from utils.cli import int_at_least, parse_with_overrides, report_errors
from utils.dataset import REFERENCE_SCENES_PER_S, FolderFeatures, StoreFeatures, benchmark_loader, print_benchmark
from utils.errors import UserError
from utils.feature_store import FEATURE_SETS, size_text
from utils.packing import pack_store

# Scene ids of the quick run's store (8,500 training ids, the 1,988 validation and 3,985 test ids) and
# of all 39,803 (real CLEVR-Change, docs/data.md).
QUICK_SCENES, ALL_SCENES = 8500 + 1988 + 3985, 39803


def write_layout(root, num_scenes, shape, seed=0):
    """root/{features,sc_features,nsc_features}/<real name>.npy for scene ids 0..num_scenes-1, and the split
    and type files that select them all (the packer reads them)."""
    rng = np.random.default_rng(seed)
    for feature_set in FEATURE_SETS:
        folder = os.path.join(root, feature_set.name)
        os.makedirs(folder, exist_ok=True)
        for scene_id in range(num_scenes):
            values = np.maximum(rng.standard_normal(shape, dtype=np.float32), 0)
            np.save(os.path.join(folder, feature_set.image_name % scene_id + ".npy"), values)
    ids = list(range(num_scenes))
    with open(os.path.join(root, "splits.json"), "w") as handle:
        json.dump({"train": ids[:-2], "val": ids[-2:-1], "test": ids[-1:]}, handle)
    with open(os.path.join(root, "type_mapping.json"), "w") as handle:
        json.dump({"color": [f"{i:06d}.png" for i in ids]}, handle)


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", required=True, help="an empty folder on the disk to measure (it is filled)")
    parser.add_argument("--scenes", type=int_at_least(16), default=2000, help="scenes to write (3 files each)")
    parser.add_argument("--cfg", default="configs/dynamic/transformer_quick.yaml", help="gives the feature shape")
    parser.add_argument("--archive", action="store_true", help="also pack from a .tar.gz of the folders")
    parser.add_argument("--workers", type=int_at_least(0), nargs="+", default=[0, 2, 4])
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parse_with_overrides(parser, argv)

    def run():
        root = args.scratch
        if os.path.exists(root) and os.listdir(root):
            raise UserError(f"--scratch {root} is not empty; give a new or empty folder")
        keys = []
        for feature_set in FEATURE_SETS:
            keys += [feature_set.feature_key, os.path.join(root, feature_set.name)]
        keys += ["data.splits_json", os.path.join(root, "splits.json"),
                 "data.type_mapping_json", os.path.join(root, "type_mapping.json")]
        cfg = load_config(args.cfg, keys + list(args.opts))
        enc = cfg.model.change_detector
        shape = (enc.feat_dim - 2, enc.grid, enc.grid)
        try:
            start = time.time()
            write_layout(root, args.scenes, shape)
            loose = sum(folder_bytes(os.path.join(root, s.name)) for s in FEATURE_SETS)
            print(f"wrote 3 x {args.scenes:,} feature files of float32 {shape}: {size_text(loose)} in "
                  f"{time.time() - start:.0f} s")
            ids = list(range(args.scenes))
            stores = {}
            for dtype in ("float16", "float32"):
                path = os.path.join(root, f"store_{dtype}.h5")
                start = time.time()
                pack_store(cfg, path, ("folders", root), dtype)
                seconds = time.time() - start
                stores[dtype] = path
                print(f"packed from the folders into {dtype}: {size_text(os.path.getsize(path))} in {seconds:.0f} s "
                      f"({3 * args.scenes / seconds:.0f} images/s)")
            if args.archive:
                archive = os.path.join(root, "features.tar.gz")
                start = time.time()
                with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
                    for s in FEATURE_SETS:
                        tar.add(os.path.join(root, s.name), arcname=s.name)
                print(f"archive: {size_text(os.path.getsize(archive))} ({os.path.getsize(archive) / loose:.2f} of the "
                      f"files; gzip level 1) in {time.time() - start:.0f} s")
                start = time.time()
                pack_store(cfg, os.path.join(root, "store_from_archive.h5"), ("archive", archive), "float16")
                seconds = time.time() - start
                print(f"packed from the archive as a stream into float16: {seconds:.0f} s ({3 * args.scenes / seconds:.0f} "
                      f"images/s, {loose / seconds / 1e6:.0f} MB/s of features)")
            # Written pages still on their way to the disk would slow the reads down: flush them first.
            os.sync()
            folders = FolderFeatures(cfg, "train", ids)
            layouts = [("loose float32 files", folders, [f for fs in folders.files for f in fs])]
            for dtype, path in stores.items():
                store_cfg = load_config(args.cfg, keys + list(args.opts) + ["data.feature_store", path])
                layouts.append((f"{dtype} store", StoreFeatures(store_cfg, "train", ids), [path]))
            batch = cfg.data.train.batch_size
            for name, features, files in layouts:
                rows = benchmark_loader(features, files, args.scenes, batch, cfg.seed, args.workers)
                print_benchmark(rows, f"\n{name}: {args.scenes:,} scenes, batches of {batch} in training order")
            per_image = {"loose": loose / (3 * args.scenes),
                         **{dtype: os.path.getsize(path) / (3 * args.scenes) for dtype, path in stores.items()}}
            print(f"\nper image: loose {per_image['loose'] / 1e6:.3f} MB, float16 store "
                  f"{per_image['float16'] / 1e6:.3f} MB, float32 store {per_image['float32'] / 1e6:.3f} MB")
            for what, scenes in (("quick run", QUICK_SCENES), ("all scene ids", ALL_SCENES)):
                print(f"{what} ({scenes:,} scenes): loose {size_text(3 * scenes * per_image['loose'])}, float16 store "
                      f"{size_text(3 * scenes * per_image['float16'])}, float32 store "
                      f"{size_text(3 * scenes * per_image['float32'])}")
            print(f"(the reference's 4090 speed needs {REFERENCE_SCENES_PER_S:.0f} scenes/s)")
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)

    report_errors(run)


if __name__ == "__main__":
    sys.exit(main())
