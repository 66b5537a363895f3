"""Caption the test split with a trained snapshot.

python test.py --cfg configs/dynamic/transformer.yaml --snapshot 10000 [--gpu ID] [--beam_size K]
writes experiments/<exp_name>/test_output/captions/test/{sc,nsc}_results.json.
"""
import argparse
import os
import sys

from tqdm import tqdm
from yacs.config import CfgNode

from configs.defaults import ConfigError, load_config
from train import make_loader, write_json
from utils.checkpoint import SnapshotError, list_snapshots, load_snapshot, load_weights, snapshot_path
from utils.dataset import DataError, RCCDataset
from utils.engine import CaptionModel, generate_captions
from utils.utils import select_device


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="the config the snapshot was trained with")
    parser.add_argument("--snapshot", type=int, required=True, help="iteration of the snapshot to load")
    parser.add_argument("--gpu", type=int, default=None, help="CUDA device id; -1 for the CPU")
    parser.add_argument("--beam_size", type=int, default=1, help="1 is greedy decoding")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    return parser.parse_args(argv)


def model_config(cfg, snapshot):
    """The config for rebuilding the model: the snapshot's model keys, this run's data and device keys."""
    merged = cfg.clone()
    merged.defrost()
    merged.model = CfgNode(snapshot["config"]["model"])
    merged.freeze()
    return merged


def run_test(cfg, iteration, beam_size=1, split="test"):
    device = select_device(cfg.gpu_id)
    print(f"device: {device}")
    path = snapshot_path(cfg, iteration)
    if not os.path.isfile(path):
        available = list_snapshots(cfg)
        raise SnapshotError(f"no snapshot for iteration {iteration} ({path}); available: "
                            + (", ".join(map(str, available)) if available else "none — train first"))
    snapshot = load_snapshot(path)
    cfg = model_config(cfg, snapshot)
    model = CaptionModel(cfg)
    load_weights(model.change_detector, snapshot["change_detector_state"], "change_detector_state", path)
    load_weights(model.speaker, snapshot["speaker_state"], "speaker_state", path)
    model.to(device).eval()

    dataset = RCCDataset(cfg, split)
    idx_to_word = {index: word for word, index in snapshot["vocab"].items()}
    loader = make_loader(dataset, cfg, device, batch_size=cfg.data[split].batch_size)
    with tqdm(total=len(dataset), desc=f"captioning {split}", unit="scene") as progress:
        sc_results, nsc_results = generate_captions(model, loader, idx_to_word, device,
                                                    beam_size=beam_size, amp=cfg.train.amp, progress=progress)
    out_dir = os.path.join(cfg.exp_dir, cfg.exp_name, "test_output", "captions", split)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "sc_results.json"), sc_results)
    write_json(os.path.join(out_dir, "nsc_results.json"), nsc_results)
    print(f"wrote {len(sc_results)} + {len(nsc_results)} captions to {out_dir}")
    return out_dir


def main(argv=None):
    args = parse_args(argv)
    try:
        overrides = list(args.opts)
        if args.gpu is not None:
            overrides += ["gpu_id", str(args.gpu)]
        run_test(load_config(args.cfg, overrides), args.snapshot, args.beam_size, args.split)
    except (ConfigError, DataError, SnapshotError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
