"""Turn a snapshot of the reference SCORER code into a snapshot of this project, for test.py.

    python research/convert_reference_snapshot.py --snapshot SCORER+CBR_checkpoint_10000.pt \
        --cfg configs/dynamic/transformer.yaml --vocab_json data/transformer_vocab.json [--iteration N]
    python test.py --cfg configs/dynamic/transformer.yaml --snapshot 10000

A reference snapshot holds `change_detector_state`, `speaker_state` and `model_cfg`, a pickled yacs
CfgNode; no CBR state (the reference never trains it) and no vocabulary. It is loaded with
torch.load(weights_only=True): only tensors and plain values are read, and the name of yacs' CfgNode
is allow-listed to rebuild as a plain dict (torch's safe-globals mechanism), so no code in the file
runs. The dimensions come from the weights' shapes, the head counts and other settings from
model_cfg where its keys match configs/defaults.py, the vocabulary from --vocab_json. The result is
written to <exp_dir>/<exp_name>/snapshots/ of --cfg (with KEY VALUE overrides), where test.py,
visualize.py and the report find it.
"""
import argparse
import collections
import os
import re
import sys

import torch

from configs.defaults import check_config, get_cfg_defaults, load_config, merge_dict
from models.captioner import CaptionModel
from utils.checkpoint import SnapshotError, config_to_dict, load_weights, save_snapshot, snapshot_path
from utils.cli import int_at_least, parse_with_overrides, report_errors
from utils.dataset import DataError, check_vocab
from utils.fileio import read_json

REFERENCE_KEYS = ("change_detector_state", "speaker_state", "model_cfg")


class _ConfigAsDict:
    """Stands in for yacs.config.CfgNode while unpickling: the node becomes a plain OrderedDict."""

    def __new__(cls, *args):
        return collections.OrderedDict()


def _plain(node):
    if isinstance(node, dict):
        return {key: _plain(value) for key, value in node.items()}
    return list(node) if isinstance(node, tuple) else node


def load_reference(path):
    """The reference snapshot's dict, its model_cfg as plain nested dicts."""
    if not os.path.isfile(path):
        raise SnapshotError(f"reference snapshot {path} does not exist")
    try:
        with torch.serialization.safe_globals([(_ConfigAsDict, "yacs.config.CfgNode")]):
            snapshot = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for truncated or foreign files
        first = str(err).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        raise SnapshotError(f"{path} cannot be read as a reference snapshot ({type(err).__name__}: "
                            f"{first[0][:200] if first else 'no details'}); only tensors, plain values and yacs "
                            f"configs are loaded") from None
    missing = [key for key in REFERENCE_KEYS if not isinstance(snapshot, dict) or key not in snapshot]
    if missing:
        raise SnapshotError(f"{path} is not a snapshot of the reference code: it lacks {', '.join(missing)}")
    snapshot["model_cfg"] = _plain(snapshot["model_cfg"])
    return snapshot


def _count(state, pattern):
    return len({m.group(1) for key in state for m in [re.match(pattern, key)] if m})


def model_keys(snapshot, path):
    """The model part of this project's config for the reference weights: shapes decide the sizes."""
    model = get_cfg_defaults().model
    reference = snapshot["model_cfg"].get("model", snapshot["model_cfg"])
    matching = {part: {key: value for key, value in (reference.get(part) or {}).items() if key in model[part]}
                for part in ("change_detector", "speaker", "cbr") if isinstance(reference.get(part), dict)}
    merge_dict(model, matching, f"{path} (model_cfg)", "model.")
    enc, dec = snapshot["change_detector_state"], snapshot["speaker_state"]
    try:
        model.change_detector.att_dim, model.change_detector.feat_dim = enc["img.0.weight"].shape[:2]
        model.change_detector.grid = enc["w_embedding.weight"].shape[0]
        model.change_detector.emb_dim = enc["embed_fc.0.weight"].shape[0]
        model.change_detector.att_layer = _count(enc, r"scorer\.(\d+)\.")
        model.speaker.vocab_size, model.speaker.word_dim = dec["core.embed.weight"].shape
        model.speaker.att_dim = dec["core.fc.0.weight"].shape[0]
        model.speaker.seq_length = dec["core.position_enc.pe"].shape[0]
        model.speaker.layer = _count(dec, r"core\.layer\.(\d+)\.")
    except KeyError as err:
        raise SnapshotError(f"{path}: the reference weights lack {err}; is it a SCORER snapshot?") from None
    model.speaker.share_wd_cls_weight = "logit.decoder.weight" in dec
    model.cbr.att_dim = model.change_detector.att_dim
    return model


def convert(reference_path, cfg, vocab_json, iteration=None):
    """Writes the converted snapshot into cfg's experiment; returns its path."""
    snapshot = load_reference(reference_path)
    if iteration is None:
        found = re.search(r"_(\d+)\.pt$", os.path.basename(reference_path))
        if found is None:
            raise SnapshotError(f"no iteration in the file name {os.path.basename(reference_path)}; pass --iteration N")
        iteration = int(found.group(1))
    cfg = cfg.clone()
    cfg.defrost()
    cfg.model = model_keys(snapshot, reference_path)
    check_config(cfg)
    cfg.freeze()
    vocab = read_json(vocab_json, "--vocab_json", error=DataError)
    check_vocab(vocab, vocab_json)
    if len(vocab) != cfg.model.speaker.vocab_size:
        raise DataError(f"{vocab_json} has {len(vocab)} words but the reference decoder has "
                        f"{cfg.model.speaker.vocab_size}; give the vocabulary the model was trained with")
    model = CaptionModel(cfg)
    load_weights(model.change_detector, snapshot["change_detector_state"], "change_detector_state", reference_path)
    load_weights(model.speaker, snapshot["speaker_state"], "speaker_state", reference_path)
    path = snapshot_path(cfg, iteration)
    if os.path.exists(path):
        raise SnapshotError(f"{path} exists already; pass another exp_name (as KEY VALUE) or --iteration")
    save_snapshot(path, {"change_detector_state": model.change_detector.state_dict(),
                         "speaker_state": model.speaker.state_dict(), "iteration": iteration,
                         "config": config_to_dict(cfg), "vocab": vocab,
                         "converted_from": os.path.abspath(reference_path)})
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshot", required=True, help="the reference snapshot (.pt)")
    parser.add_argument("--cfg", required=True, help="config whose experiment folder receives the snapshot")
    parser.add_argument("--vocab_json", required=True, help="the vocabulary the reference model was trained with")
    parser.add_argument("--iteration", type=int_at_least(0), help="iteration to file it under (default: from the file name)")
    args = parse_with_overrides(parser, argv)

    def run():
        return convert(args.snapshot, load_config(args.cfg, args.opts), args.vocab_json, args.iteration)

    path = report_errors(run)
    iteration = torch.load(path, map_location="cpu", weights_only=True)["iteration"]
    print(f"wrote {path}; test it with: python test.py --cfg {args.cfg} --snapshot {iteration}"
          + (" " + " ".join(args.opts) if args.opts else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
