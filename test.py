"""Caption a split with a trained snapshot.

    python test.py --cfg configs/dynamic/transformer_quick.yaml --snapshot best [--gpu ID] [--beam_size K]
                   [--split test] [KEY VALUE ...]

--snapshot takes an iteration, "best" (the highest validation CIDEr, from best_snapshot.json) or
"last". Writes <exp_dir>/<exp_name>/test_output/captions/<split>/{sc,nsc}_results.json.
"""
import argparse
import sys

from tqdm import tqdm

from models.loading import load_trained_model
from utils.captioning import generate_captions, write_captions
from utils.cli import int_at_least, parse_with_overrides, report_errors, snapshot_choice, trained_experiment
from utils.dataset import RCCDataset, eval_loader
from utils.device import select_device
from utils.layout import ExperimentLayout


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="the config the snapshot was trained with")
    parser.add_argument("--snapshot", type=snapshot_choice, required=True,
                        help="iteration of the snapshot, best (highest validation CIDEr) or last")
    parser.add_argument("--gpu", type=int_at_least(-1), default=None, help="CUDA device id; -1 for the CPU")
    parser.add_argument("--beam_size", type=int_at_least(1), default=1, help="1 is greedy decoding")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    return parse_with_overrides(parser, argv)


def run_test(cfg, iteration, beam_size=1, split="test", device=None):
    """Captions of the split by snapshot ``iteration`` on ``device`` (None: the one cfg.gpu_id names);
    returns the folder they were written to."""
    if device is None:
        device = select_device(cfg.gpu_id)
    print(f"device: {device}")
    model, idx_to_word, cfg = load_trained_model(cfg, iteration, device)
    dataset = RCCDataset(cfg, split)
    with tqdm(total=len(dataset), desc=f"captioning {split}", unit="scene") as progress:
        sc_results, nsc_results = generate_captions(model, eval_loader(dataset, cfg, device), idx_to_word, device,
                                                    beam_size=beam_size, amp=cfg.train.amp, progress=progress)
    out_dir = ExperimentLayout.of(cfg).test_captions_of(split)
    write_captions(out_dir, sc_results, nsc_results)
    print(f"wrote {len(sc_results)} + {len(nsc_results)} captions of snapshot {iteration} to {out_dir}")
    return out_dir


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)

    def run():
        cfg, device, iteration = trained_experiment(args, "test.py", argv)
        run_test(cfg, iteration, args.beam_size, args.split, device)

    report_errors(run)


if __name__ == "__main__":
    main()
