"""Caption the test split with a trained snapshot.

python test.py --cfg configs/dynamic/transformer.yaml --snapshot 10000 [--gpu ID] [--beam_size K]
writes experiments/<exp_name>/test_output/captions/test/{sc,nsc}_results.json.
"""
import argparse
import os
import sys

from tqdm import tqdm

from configs.defaults import ConfigError, load_config
from train import make_loader
from utils.checkpoint import SnapshotError
from utils.dataset import DataError, RCCDataset
from models.captioner import generate_captions, load_trained_model
from utils.fileio import write_json_atomic
from utils.device import select_device


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="the config the snapshot was trained with")
    parser.add_argument("--snapshot", type=int, required=True, help="iteration of the snapshot to load")
    parser.add_argument("--gpu", type=int, default=None, help="CUDA device id; -1 for the CPU")
    parser.add_argument("--beam_size", type=int, default=1, help="1 is greedy decoding")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    return parser.parse_args(argv)


def run_test(cfg, iteration, beam_size=1, split="test"):
    device = select_device(cfg.gpu_id)
    print(f"device: {device}")
    model, idx_to_word, cfg = load_trained_model(cfg, iteration, device)
    dataset = RCCDataset(cfg, split)
    loader = make_loader(dataset, cfg, device, batch_size=cfg.data[split].batch_size)
    with tqdm(total=len(dataset), desc=f"captioning {split}", unit="scene") as progress:
        sc_results, nsc_results = generate_captions(model, loader, idx_to_word, device,
                                                    beam_size=beam_size, amp=cfg.train.amp, progress=progress)
    out_dir = os.path.join(cfg.exp_dir, cfg.exp_name, "test_output", "captions", split)
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "sc_results.json"), sc_results)
    write_json_atomic(os.path.join(out_dir, "nsc_results.json"), nsc_results)
    print(f"wrote {len(sc_results)} + {len(nsc_results)} captions to {out_dir}")
    return out_dir


def main(argv=None):
    args = parse_args(argv)
    try:
        run_test(load_config(args.cfg, args.opts, gpu_id=args.gpu), args.snapshot, args.beam_size, args.split)
    except (ConfigError, DataError, SnapshotError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
