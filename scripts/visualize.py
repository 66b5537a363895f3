"""Triplet figures: what a trained snapshot says about (before, changed, distractor) scenes.

    python scripts/visualize.py --cfg configs/dynamic/transformer.yaml --snapshot 10000 \
        --per_type 1 [--attention] [--split test] [--output_dir DIR] [KEY VALUE ...]

Pick the scenes with --ids 12 40, --per_type N (the first N of every change type) or
--random N --seed S. Each scene gives one PNG (<output_dir>/triplet_<split>_<id>.png, default
output_dir experiments/<exp_name>/figures): the three images side by side, the generated
caption of the (before, changed) and the (before, distractor) pair, a few reference captions,
the change type and whether the captions got it right (the changed pair read as the true change
type, the distractor pair as "no change"; see utils.eval_utils.classify_caption). On synthetic
data (scenes.json next to the data) the changed pair is RIGHT only when its caption also names
the changed object and its new value (utils/object_score.py), else "RIGHT TYPE, WRONG OBJECT" or
the like with the true object, and the true box of the changed object is drawn. --attention adds
two rows of heatmaps over the images: the encoder's cross-view attention and the decoder's
attention over the feature grid. triplets.json in the output folder lists every figure drawn there.
"""
import argparse
import json
import os
import random
import sys
import textwrap

import matplotlib
import numpy as np
import torch
from PIL import Image

from models.loading import load_trained_model
from utils.cli import parse_with_overrides, report_errors, snapshot_choice, trained_experiment
from utils.dataset import RCCDataset
from utils.device import select_device
from utils.errors import UserError
from utils.eval_utils import EvalError, classify_caption, load_references
from utils.figures import attention_maps, show
from utils.fileio import read_json, write_json_atomic
from utils.object_score import SCENES_FILE, describe, judge, scene_truth
from utils.text import CHANGE_TYPES
from utils.utils import decode_sequence

matplotlib.use("Agg")  # files only: no display on the training machines
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

INDEX_FILE = "triplets.json"
FIG_WIDTH = 15.0  # inches; three panels of 5 inches
DPI = 100
TEXT_LINE = 0.34  # inches per text line at the caption font size
CAPTION_FONT = 14
WRAP = 125  # characters per caption line at CAPTION_FONT over FIG_WIDTH
RIGHT, PARTLY, WRONG = "#1a7f37", "#b26a00", "#c62828"
PANELS = (("before", "d_img_path", "default"), ("changed", "q_img_path", "semantic"),
          ("distractor", "n_img_path", "nonsemantic"))


class VisualizeError(UserError):
    """Scene selection or inputs that cannot be drawn; the message says what to change."""


def default_output_dir(cfg):
    return os.path.join(cfg.exp_dir, cfg.exp_name, "figures")


def select_indices(dataset, ids=None, per_type=None, random_n=None, seed=0):
    """Dataset positions of the chosen scenes: given ids, the first N per change type, or N at random."""
    chosen = [ids is not None, per_type is not None, random_n is not None]
    if sum(chosen) != 1:
        raise VisualizeError("choose the scenes with exactly one of --ids, --per_type, --random")
    if ids is not None:
        position = {scene_id: i for i, scene_id in enumerate(dataset.ids)}
        missing = [i for i in ids if i not in position]
        if missing:
            raise VisualizeError(f"scene ids {missing} are not in the '{dataset.split}' split "
                                 f"({len(dataset.ids)} ids, e.g. {dataset.ids[:5]}); pick ids from "
                                 f"{dataset.cfg.data.splits_json} or use another --split")
        return [position[i] for i in ids]
    if per_type is not None:
        if per_type < 1:
            raise VisualizeError(f"--per_type must be at least 1, got {per_type}")
        picked = []
        for t in range(len(CHANGE_TYPES)):
            picked += [i for i, ct in enumerate(dataset.change_types) if ct == t][:per_type]
        return picked
    if not 1 <= random_n <= len(dataset):
        raise VisualizeError(f"--random must be between 1 and {len(dataset)} (scenes in the "
                             f"'{dataset.split}' split), got {random_n}")
    return sorted(random.Random(seed).sample(range(len(dataset)), random_n))


def load_scenes(cfg):
    """({scene id: scene}, path) from scenes.json next to the data (synthetic sets only), else ({}, None)."""
    for folder in (os.path.dirname(cfg.data.splits_json), os.path.dirname(cfg.data.default_img_dir)):
        path = os.path.join(folder, SCENES_FILE)
        if os.path.isfile(path):
            data = read_json(path, "scene file", "re-generate the data set", VisualizeError)
            return {int(scene["image_id"]): scene for scene in data.get("scenes", [])}, path
    return {}, None


def judge_record(record, truth=None):
    """Sets the verdicts of a captioned scene's pairs: right_type, object (utils.object_score.judge, None
    without a scene truth), truth (the true object in words), verdict ("right", "wrong type", "right type,
    wrong object", ...) and right of the changed pair; right of the distractor pair."""
    changed = record["changed"]
    changed["right_type"] = changed["read_as"] == record["change_type"]
    changed["object"] = judge(changed["caption"], truth) if truth is not None else None
    changed["truth"] = describe(truth) if truth is not None else None
    judged = changed["object"]
    if not changed["right_type"]:
        changed["verdict"] = "wrong type"
    elif judged is None or judged["all_right"]:
        changed["verdict"] = "right"
    else:
        wrong = [] if judged["object_named"] else ["object"]
        if judged["new_value"] is False and record["change_type"] != "add":  # add: the new value is the object
            wrong.append("new value")
        changed["verdict"] = f"right type, wrong {' and '.join(wrong)}"
    changed["right"] = changed["verdict"] == "right"
    record["distractor"]["right"] = record["distractor"]["read_as"] == "no_change"


@torch.no_grad()
def caption_scenes(model, dataset, indices, idx_to_word, device, beam_size=1, references=None, truths=None):
    """One record per scene: captions, verdicts, references, attention maps as (H, W) arrays.

    ``truths``: {scene id: utils.object_score.scene_truth}; a scene in it is judged on the object too.
    """
    items = [dataset[i] for i in indices]
    bef = torch.stack([item["d_feat"] for item in items]).to(device)
    H, W = bef.shape[-2:]
    records = [{"scene_id": int(item["image_id"]),
                "change_type": CHANGE_TYPES[item["change_type"]],
                "paths": {name: item[key] for name, key, _ in PANELS},
                "grid": [int(H), int(W)]} for item in items]
    for pair, key in (("changed", "q_feat"), ("distractor", "n_feat")):
        aft = torch.stack([item[key] for item in items]).to(device)
        generated = model.generate(bef, aft, beam_size=beam_size)
        tokens = generated.tokens  # beam search returns one row per image (the best beam), like greedy decoding
        captions = decode_sequence(idx_to_word, tokens)
        for b, record in enumerate(records):
            record[pair] = {"caption": captions[b], "read_as": classify_caption(captions[b]),
                            **attention_maps(generated, b, (H, W), idx_to_word)}
    for record in records:
        judge_record(record, (truths or {}).get(record["scene_id"]))
        key = f"{record['scene_id']:06d}.png"
        refs = references or {}
        record["references"] = {"changed": refs.get(key, [])[:2], "distractor": refs.get(key + "_n", [])[:1]}
    return records


def _load_image(path):
    if not os.path.isfile(path):
        raise VisualizeError(f"image {path} does not exist; check data.default_img_dir, "
                             f"data.semantic_img_dir and data.nonsemantic_img_dir in the config")
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _verdict(pair, truth):
    read_as = (pair["read_as"] or "unclear").replace("_", " ")
    judged = pair.get("object")
    if pair["right"]:
        checked = "" if judged is None else "; right object" + (
            " and new value" if judged["new_value"] is not None and truth != "add" else "")
        return f"RIGHT (read as {read_as}{checked})"
    if pair.get("right_type"):
        return f"{pair['verdict'].upper()} (read as {read_as}; true: {pair['truth']})"
    return f"WRONG (read as {read_as}, true: {truth.replace('_', ' ')})"


def _colour(pair):
    return RIGHT if pair["right"] else PARTLY if pair.get("right_type") else WRONG


def _text_lines(record, title, has_box):
    """[(text, colour, weight)] of the caption block, wrapped to the figure width."""
    lines = [(title, "black", "bold")]
    for pair, truth, label in (("changed", record["change_type"], "before → changed"),
                               ("distractor", "no_change", "before → distractor")):
        info = record[pair]
        colour = _colour(info)
        text = f"Generated ({label}): \"{info['caption']}\"  {_verdict(info, truth)}"
        lines += [(part, colour, "bold") for part in textwrap.wrap(text, WRAP, subsequent_indent="    ")]
    for pair, label in (("changed", "Reference (change)"), ("distractor", "Reference (no change)")):
        for ref in record["references"][pair]:
            lines += [(part, "#444444", "normal")
                      for part in textwrap.wrap(f"{label}: \"{ref}\"", WRAP, subsequent_indent="    ")]
    if not any(record["references"].values()):
        lines.append(("No reference captions for this scene in data.anno_json.", "#444444", "normal"))
    if has_box:
        lines.append(("Red dashed box: the true position of the changed object (scenes.json).",
                      "#444444", "normal"))
    return lines


def draw_triplet(record, path, attention=False, scene=None, title=None):
    """Writes the figure of one captioned scene (a record of caption_scenes) to ``path``."""
    images = {name: _load_image(record["paths"][name]) for name, _, _ in PANELS}
    h, w = images["before"].shape[:2]
    panel_h = FIG_WIDTH / 3 * h / w + 0.45  # image plus its title
    title = title or f"Scene {record['scene_id']:06d}: change type {record['change_type']}"
    boxes = {}
    if scene is not None:
        changed = scene["objects"][scene["changed_object"]]["boxes"]
        boxes = {name: changed.get(view) for name, _, view in PANELS}
    lines = _text_lines(record, title, any(boxes.values()))
    text_h = TEXT_LINE * len(lines) + 0.3
    rows = 3 if attention else 1
    fig_h = panel_h * rows + text_h
    fig = plt.figure(figsize=(FIG_WIDTH, fig_h), dpi=DPI)

    def row_axes(row):
        bottom = fig_h - panel_h * (row + 1)
        return [fig.add_axes([i / 3 + 0.005, bottom / fig_h, 1 / 3 - 0.01, (panel_h - 0.45) / fig_h])
                for i in range(3)]

    for ax, (name, _, _) in zip(row_axes(0), PANELS):
        show(ax, images[name], name, box=boxes.get(name))
    if attention:
        ch, di = record["changed"], record["distractor"]
        maps = [("before: attention from changed", images["before"], ch["enc_before"]),
                ("changed: attention from before", images["changed"], ch["enc_after"]),
                ("distractor: attention from before", images["distractor"], di["enc_after"])]
        for ax, (label, image, heat) in zip(row_axes(1), maps):
            show(ax, image, f"encoder | {label}", heat=heat)
        maps = [("decoder | changed pair, on before", images["before"], ch["decoder"]),
                ("decoder | changed pair, on changed", images["changed"], ch["decoder"]),
                ("decoder | distractor pair", images["distractor"], di["decoder"])]
        for ax, (label, image, heat) in zip(row_axes(2), maps):
            show(ax, image, label, heat=heat)
    top = text_h - 0.25
    for i, (text, colour, weight) in enumerate(lines):
        y = (top - i * TEXT_LINE) / fig_h
        fig.text(0.01, y, text, fontsize=CAPTION_FONT + (2 if i == 0 else 0), color=colour,
                 weight=weight, va="top", ha="left", family="DejaVu Sans")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _index_entry(record, file_name, iteration, split):
    return {"file": file_name, "scene_id": record["scene_id"], "split": split, "snapshot": iteration,
            "change_type": record["change_type"],
            "changed_caption": record["changed"]["caption"], "changed_read_as": record["changed"]["read_as"],
            "changed_right": record["changed"]["right"], "changed_right_type": record["changed"]["right_type"],
            "changed_verdict": record["changed"]["verdict"], "changed_object": record["changed"]["object"],
            "distractor_caption": record["distractor"]["caption"],
            "distractor_read_as": record["distractor"]["read_as"],
            "distractor_right": record["distractor"]["right"],
            "references": record["references"]}


def _update_index(output_dir, entries):
    """Adds ``entries`` to triplets.json (replacing older ones of the same file), atomically."""
    path = os.path.join(output_dir, INDEX_FILE)
    existing = []
    if os.path.isfile(path):
        with open(path) as handle:
            try:
                existing = json.load(handle)
            except json.JSONDecodeError:
                existing = []  # an index we cannot read is rebuilt from this run
    new_files = {e["file"] for e in entries}
    merged = [e for e in existing if e.get("file") not in new_files] + entries
    write_json_atomic(path, merged)
    return path


def make_figures(cfg, iteration, ids=None, per_type=None, random_n=None, seed=0, split="test",
                 output_dir=None, attention=False, beam_size=1, device=None):
    """Draws one PNG per chosen scene on ``device`` (None: the one cfg.gpu_id names); returns the index
    entries (file paths under output_dir)."""
    output_dir = output_dir or default_output_dir(cfg)
    if device is None:
        device = select_device(cfg.gpu_id)
    model, idx_to_word, model_cfg = load_trained_model(cfg, iteration, device)
    dataset = RCCDataset(model_cfg, split)
    indices = select_indices(dataset, ids, per_type, random_n, seed)
    try:
        references = load_references(cfg.data.anno_json)
    except EvalError:
        references = {}  # figures still show the generated captions; the text says none found
    scenes, scenes_path = load_scenes(cfg)
    truths = {scene_id: scene_truth(scene, scenes_path) for scene_id, scene in scenes.items()}
    entries = []
    for start in range(0, len(indices), 32):  # bounded memory for long --ids lists
        chunk = indices[start:start + 32]
        records = caption_scenes(model, dataset, chunk, idx_to_word, device, beam_size, references, truths)
        for record in records:
            name = f"triplet_{split}_{record['scene_id']:06d}.png"
            title = (f"Scene {record['scene_id']:06d} ({split}): change type {record['change_type']}"
                     f"  |  snapshot {iteration}")
            draw_triplet(record, os.path.join(output_dir, name), attention,
                         scenes.get(record["scene_id"]), title)
            entries.append(_index_entry(record, name, iteration, split))
    _update_index(output_dir, entries)
    return entries


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="the config the snapshot was trained with")
    parser.add_argument("--snapshot", type=snapshot_choice, required=True,
                        help="iteration of the snapshot, best (highest validation CIDEr) or last")
    pick = parser.add_mutually_exclusive_group(required=True)
    pick.add_argument("--ids", nargs="+", help="scene ids, e.g. --ids 12 40")
    pick.add_argument("--per_type", type=int, help="the first N scenes of each change type")
    pick.add_argument("--random", type=int, dest="random_n", help="N scenes drawn at random")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--output_dir", default=None, help="default: <exp_dir>/<exp_name>/figures")
    parser.add_argument("--attention", action="store_true", help="add encoder and decoder attention rows")
    parser.add_argument("--beam_size", type=int, default=1, help="1 is greedy decoding")
    parser.add_argument("--gpu", type=int, default=None, help="CUDA device id; -1 for the CPU")
    args = parse_with_overrides(parser, argv)
    if args.ids is not None:
        # --ids takes every word after it; the first one that is not a number starts the overrides.
        count = next((i for i, word in enumerate(args.ids) if not word.isdigit()), len(args.ids))
        if count == 0:
            parser.error(f"--ids needs scene ids (numbers), got {args.ids[0]!r}")
        args.opts = args.ids[count:] + list(args.opts)
        args.ids = [int(word) for word in args.ids[:count]]
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)

    def run():
        cfg, device, iteration = trained_experiment(args, "scripts/visualize.py", argv)
        return cfg, make_figures(cfg, iteration, args.ids, args.per_type, args.random_n, args.seed,
                                 args.split, args.output_dir, args.attention, args.beam_size, device)

    cfg, entries = report_errors(run)
    output_dir = args.output_dir or default_output_dir(cfg)
    for entry in entries:
        distractor = "right" if entry["distractor_right"] else "wrong"
        print(f"{os.path.join(output_dir, entry['file'])}: {entry['change_type']}, changed pair "
              f"{entry['changed_verdict']}, distractor pair {distractor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
