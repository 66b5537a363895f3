"""Does the encoder's difference representation carry the change? A probe of trained snapshots.

    python research/probe_encoder.py --cfg configs/dynamic/transformer_demo.yaml --snapshot 200 --snapshot best
                                    [--scenes 50] [--split test] [KEY VALUE ...]

For evenly spaced scenes of the split (d: before, q: changed, n: distractor) it prints, per snapshot:
  - the share of the encoder's output values E(d, q) above zero, and of its output units above zero
    for at least one scene and token (near 0: the final ReLU is dead and the decoder sees nothing);
  - the entropy of the last SCORER block's before-to-after attention (log N: uniform);
  - |E(d, q) - E(d, d)| / |E(d, d)| and the same for n: how much the output moves when the after view
    changes, for real changes and for distractors.
docs/ablation.md uses it to explain why the reconstruction-only variant collapses.
"""
import argparse
import math
import sys

import torch

from configs.defaults import load_config
from models.loading import load_trained_model
from utils.cli import int_at_least, parse_with_overrides, report_errors, snapshot_choice, snapshot_for
from utils.dataset import RCCDataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="the config the snapshots were trained with")
    parser.add_argument("--snapshot", type=snapshot_choice, action="append", required=True,
                        help="an iteration, best or last; repeat the flag for several snapshots")
    parser.add_argument("--scenes", type=int_at_least(1), default=50, help="scenes of the split, evenly spaced")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    args = parse_with_overrides(parser, argv)
    if args.scenes < 1:
        parser.error(f"--scenes must be at least 1, got {args.scenes}")
    return args


def relative_change(moved, base):
    """Mean over scenes of |moved - base| / |base| (Frobenius norms of (N, emb_dim)); None where base is all zero."""
    base_norm = base.norm(dim=(1, 2))  # (B,)
    if bool((base_norm == 0).any()):
        return None
    return ((moved - base).norm(dim=(1, 2)) / base_norm).mean().item()


def probe(model, bef, changed, distractor):
    """The figures above for a CaptionModel and before / changed / distractor features (B, C, H, W)."""
    with torch.no_grad():
        same = model.encode(bef, bef).out
        encoded = model.encode(bef, changed)
        moved = model.encode(bef, distractor).out
    out, attention = encoded.out, encoded.attention_ba  # (B, N, emb_dim); (B, N, N) or None (subtraction)
    entropy = None
    if attention is not None:
        entropy = -(attention.clamp_min(1e-12).log() * attention).sum(-1).mean().item()
    return {"active": (out > 0).float().mean().item(),
            "units_alive": (out > 0).flatten(0, 1).any(0).float().mean().item(),  # over (B*N) rows
            "entropy": entropy, "uniform": math.log(out.shape[1]),
            "change": relative_change(out, same), "distractor": relative_change(moved, same)}


def _fmt(value):
    return "undefined (E(d,d) = 0)" if value is None else f"{value:.3f}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)

    def run():
        cfg = load_config(args.cfg, args.opts, gpu_id=-1)
        data = None
        for choice in args.snapshot:
            iteration = snapshot_for(cfg, choice, args.cfg, "research/probe_encoder.py", argv)
            model, _, model_cfg = load_trained_model(cfg, iteration, torch.device("cpu"))
            if data is None:
                dataset = RCCDataset(model_cfg, args.split, verbose=False)
                picks = [dataset[i] for i in range(0, len(dataset), max(1, len(dataset) // args.scenes))][:args.scenes]
                data = [torch.stack([item[key] for item in picks]) for key in ("d_feat", "q_feat", "n_feat")]
            found = probe(model, *data)
            attention = ("- (no SCORER block)" if found["entropy"] is None
                         else f"{found['entropy']:.2f} (uniform {found['uniform']:.2f})")
            print(f"snapshot {iteration}: output values > 0 {100 * found['active']:.1f} %, units ever > 0 "
                  f"{100 * found['units_alive']:.1f} %; attention entropy {attention}; "
                  f"|E(d,q)-E(d,d)|/|E(d,d)| {_fmt(found['change'])}, |E(d,n)-E(d,d)|/|E(d,d)| "
                  f"{_fmt(found['distractor'])} ({len(data[0])} {args.split} scenes)")

    report_errors(run)


if __name__ == "__main__":
    main()
