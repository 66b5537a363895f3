"""Score generated change captions and report the best snapshot.

    python evaluate.py --results_dir ./experiments/SCORER+CBR/eval_sents \
        [--anno ./data/total_change_captions_reformat.json --type_file ./data/type_mapping.json]

Every folder under --results_dir holding sc_results.json (captions of changed pairs, image ids
"000123.png") and nsc_results.json (captions of distractor pairs, "000123.png_n") is scored:
changed pairs, each change type, distractor pairs, and all captions together, with BLEU-1..4,
METEOR, ROUGE-L, CIDEr and SPICE (None when SPICE cannot run offline), plus change-detection
figures read off the captions. On data whose scenes are known (--scenes, or the scenes.json the
synthetic generator writes next to the annotations) also the object-level score of
utils/object_score.py: whether each changed pair's caption names the object that changed and its
new value. Then the best value of each metric across folders. Writes eval_results.txt (tables)
and eval_results.json into --results_dir and prints the tables.

--anno and --type_file default to the files the experiment was trained with (data.anno_json and
data.type_mapping_json of its config.yaml) when --results_dir is an experiment's eval_sents or
test_output/captions.
"""
import argparse
import glob
import os
import re
import sys
import time

import yaml

from configs.defaults import get_cfg_defaults
from utils.eval_utils import (CHANGE_TYPES, SCORERS, CaptionScorer, EvalError, change_detection,
                              load_references, load_results, load_type_mapping)
from utils.cli import command_with
from utils.fileio import write_json_atomic, write_text_atomic
from utils.layout import CAPTION_FILES, ExperimentLayout
from utils.object_score import FIGURES, SCENES_FILE, load_scenes, object_scores, scenes_beside

SPLITS = ("semantic",) + CHANGE_TYPES + ("non_semantic", "total")
OUTPUT_FILES = ("eval_results.txt", "eval_results.json")


def _natural_key(text):
    # "sents_1000" sorts before "sents_10000"
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _sibling_results(results_dir):
    """Other experiments' folders of the same kind: <exp_dir>/*/<the same tail> when results_dir is
    <exp_dir>/<exp_name>/eval_sents or <exp_dir>/<exp_name>/test_output/captions."""
    parts = os.path.normpath(results_dir).split(os.sep)
    for depth in (1, 2):  # eval_sents; test_output/captions
        tail, experiment = parts[-depth:], parts[:-depth]
        if tail in (["eval_sents"], ["test_output", "captions"]) and experiment:
            pattern = os.path.join(os.sep.join(experiment[:-1]) or ".", "*", *tail)
            return sorted(path for path in glob.glob(pattern) if os.path.isdir(path))
    return []


# The flags evaluate.py can take from an experiment's config.yaml: flag -> (config key, what the file is).
DATA_FLAGS = {"anno": ("anno_json", "annotation file"), "type_file": ("type_mapping_json", "type file")}


def experiment_files(results_dir):
    """{"anno", "type_file", "config"}: the files the config.yaml of the experiment holding results_dir (its
    eval_sents or test_output/captions) names, or None when results_dir is elsewhere or has no readable config."""
    root = ExperimentLayout.root_of_results(results_dir)
    return None if root is None else _config_files(root)


def _config_files(root):
    """{"anno", "type_file", "config"} of the config.yaml in experiment folder ``root``, or None."""
    config = ExperimentLayout(root, os.path.basename(root)).config
    try:
        with open(config) as handle:
            data = yaml.safe_load(handle)["data"]
        files = {flag: str(data[key]) for flag, (key, _) in DATA_FLAGS.items()}
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return {**files, "config": _shown(config)}


def _shown(path):
    """path relative to the working folder when it lies inside it, else absolute (for messages)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _with_experiment_files(argv, results_dir):
    """The evaluate.py command of argv for results_dir, with the annotation and type files of its experiment's
    config when that config names files that exist."""
    files = experiment_files(results_dir)
    flags = {"results_dir": results_dir}
    if files is not None and all(os.path.isfile(files[flag]) for flag in DATA_FLAGS):
        flags.update({flag: files[flag] for flag in DATA_FLAGS})
    return command_with("evaluate.py", argv, **flags)


def _configured_files(results_dir):
    """[(config.yaml, files)] of the experiments beside results_dir's (or in the default exp_dir) whose config
    names files that exist."""
    root = ExperimentLayout.root_of_results(results_dir)
    exp_dir = os.path.dirname(root) if root is not None else get_cfg_defaults().exp_dir
    found = []
    for folder in sorted(glob.glob(os.path.join(exp_dir, "*", ""))):
        files = _config_files(os.path.normpath(folder))
        if files is not None and all(os.path.isfile(files[flag]) for flag in DATA_FLAGS):
            found.append((files["config"], files))
    return found


def data_files(results_dir, anno, type_file, argv=()):
    """(annotation file, type file): as given, else those of the config.yaml of results_dir's experiment.
    A file that is not given and cannot be taken from a config, or that does not exist, is an EvalError that
    names the files the experiments' configs point to and the command that works."""
    given = {"anno": anno, "type_file": type_file}
    own = experiment_files(results_dir)
    chosen = {flag: path if path is not None else own and own[flag] for flag, path in given.items()}
    problems = []
    unknown = [f"--{flag}" for flag, path in chosen.items() if path is None]
    if unknown:
        verb, pronoun = ("is", "it") if len(unknown) == 1 else ("are", "them")
        problems.append(f"{' and '.join(unknown)} {verb} needed ({results_dir} is not in an experiment folder with a "
                        f"config.yaml to take {pronoun} from)")
    for flag, (key, what) in DATA_FLAGS.items():
        path = chosen[flag]
        if path is not None and not os.path.isfile(path):
            origin = f"--{flag}" if given[flag] is not None else f"data.{key} of {own['config']}"
            problems.append(f"{what} {path} ({origin}) does not exist")
    if not problems:
        return chosen["anno"], chosen["type_file"]
    message = "; ".join(problems)
    if own is not None and all(os.path.isfile(own[flag]) for flag in DATA_FLAGS):
        message += (f". The experiment was trained with the files of {own['config']}: "
                    f"{command_with('evaluate.py', argv, **{flag: own[flag] for flag in DATA_FLAGS})}")
    else:
        named = _configured_files(results_dir)
        if named:
            message += ". The experiments' configs point to: " + "; ".join(
                f"{config}: --anno {files['anno']} --type_file {files['type_file']}" for config, files in named)
        else:
            message += (". Give the data.anno_json and data.type_mapping_json of the config you trained with, "
                        "e.g. --anno data/total_change_captions_reformat.json --type_file data/type_mapping.json")
    raise EvalError(message)


def find_result_folders(results_dir, argv=()):
    """Folders under results_dir (relative paths, "." for itself) holding both result files."""
    if not os.path.isdir(results_dir):
        others = _sibling_results(results_dir)
        hint = ""
        if others:
            hint = "; these experiments have one: " + "; ".join(_with_experiment_files(argv, path) for path in others)
        raise EvalError(f"results folder {results_dir} does not exist{hint}")
    folders = []
    for root, dirs, files in os.walk(results_dir):
        dirs.sort()
        present = [name for name in CAPTION_FILES if name in files]
        if not present:
            continue
        missing = [name for name in CAPTION_FILES if name not in files]
        if missing:
            raise EvalError(f"{root} has {present[0]} but no {missing[0]}; every results "
                            f"folder needs both {CAPTION_FILES[0]} and {CAPTION_FILES[1]}")
        folders.append(os.path.relpath(root, results_dir))
    if not folders:
        raise EvalError(f"no results found in {results_dir}: expected folders holding "
                        f"{CAPTION_FILES[0]} and {CAPTION_FILES[1]} (written by train.py "
                        f"under eval_sents/ and by test.py under test_output/captions/)")
    return sorted(folders, key=_natural_key)


def _load_folder(results_dir, folder, references, image_types):
    path = os.path.join(results_dir, folder)
    sc_file, nsc_file = (os.path.join(path, name) for name in CAPTION_FILES)
    sc, nsc = load_results(sc_file), load_results(nsc_file)
    if not sc and not nsc:
        raise EvalError(f"{path}: both {CAPTION_FILES[0]} and {CAPTION_FILES[1]} are empty")
    for file, results, distractor in ((sc_file, sc, False), (nsc_file, nsc, True)):
        for image_id in results:
            if image_id.endswith("_n") != distractor:
                kind = "distractor ids ending in _n" if distractor else "ids without _n"
                raise EvalError(f"{file}: image id {image_id} is misplaced; this file holds "
                                f"{kind}")
            if image_id not in references:
                raise EvalError(f"{file}: image id {image_id} has no reference caption in the "
                                f"annotation file; check --anno")
            if not distractor and image_id not in image_types:
                raise EvalError(f"{file}: image id {image_id} has no change type in the type "
                                f"file; check --type_file")
    return sc, nsc


def evaluate_dir(results_dir, anno_json, type_file, metrics=SCORERS, argv=(), scenes=None):
    """Score every results folder; returns the report (what eval_results.json holds).

    ``scenes``: a scenes.json whose scene truth gives the object-level score of every folder
    (None: no object-level score).
    """
    folders = find_result_folders(results_dir, argv)
    references = load_references(anno_json)
    image_types = load_type_mapping(type_file)
    truths = load_scenes(scenes) if scenes is not None else None
    loaded = {f: _load_folder(results_dir, f, references, image_types) for f in folders}
    objects = {f: object_scores(sc, truths, image_types, scenes) if truths is not None else None
               for f, (sc, _) in loaded.items()}

    # One scorer for every caption of every folder: tokenized once, then sliced.
    hypotheses, refs = {}, {}
    for folder, (sc, nsc) in loaded.items():
        for image_id, caption in {**sc, **nsc}.items():
            hypotheses[(folder, image_id)] = caption
            refs[(folder, image_id)] = references[image_id]

    report = {"results_dir": results_dir, "anno": anno_json, "type_file": type_file, "scenes": scenes,
              "folders": {}}
    subsets = {}
    for folder, (sc, nsc) in loaded.items():
        split_ids = {"semantic": list(sc), "non_semantic": list(nsc),
                     "total": list(sc) + list(nsc)}
        for change in CHANGE_TYPES:
            split_ids[change] = [i for i in sc if image_types[i] == change]
        for split in SPLITS:
            subsets[(folder, split)] = [(folder, i) for i in split_ids[split]]
    with CaptionScorer(hypotheses, refs, metrics) as scorer:
        scores = scorer.score_subsets(subsets)
        names = scorer.names
    for folder, (sc, nsc) in loaded.items():
        report["folders"][folder] = {
            "scores": {split: {"count": len(subsets[(folder, split)]),
                               **scores[(folder, split)]} for split in SPLITS},
            "change_detection": change_detection(sc, nsc, image_types),
            "object_score": objects[folder],
        }
    report["metrics"] = names
    report["best"] = _best(report["folders"], names)
    return report


def _best(folder_reports, names):
    """{split: {metric: {"value", "folder"}}}: the highest value over folders (first on ties)."""
    best = {}
    for split in SPLITS:
        best[split] = {}
        for name in names:
            top = None
            for folder, rep in folder_reports.items():
                value = rep["scores"][split][name]
                if value is not None and (top is None or value > top["value"]):
                    top = {"value": value, "folder": folder}
            best[split][name] = top
    return best


def _fmt(value, scale=100.0):
    return "-" if value is None else f"{value * scale:.2f}"


def format_report(report):
    """The human-readable tables (scores x 100)."""
    names = report["metrics"]
    head = f"{'split':<14}{'n':>6}" + "".join(f"{name:>9}" for name in names)
    lines = [f"Caption scores x 100 for {report['results_dir']}",
             f"references: {report['anno']}; change types: {report['type_file']}", ""]
    for folder, rep in report["folders"].items():
        lines += [f"== {folder}", head]
        for split in SPLITS:
            row = rep["scores"][split]
            label = f"  {split}" if split in CHANGE_TYPES else split
            lines.append(f"{label:<14}{row['count']:>6}" +
                         "".join(f"{_fmt(row[name]):>9}" for name in names))
        det = rep["change_detection"]
        per_type = ", ".join(f"{t} {_fmt(v, 100)}%" for t, v in det["per_type_correct"].items())
        lines += [
            f"change detection from the captions: distractor pairs captioned 'no change' "
            f"{_fmt(det['distractor_no_change'])}% (of {det['distractor_pairs']}); changed "
            f"pairs captioned as a change {_fmt(det['change_detected'])}%, as the right type "
            f"{_fmt(det['change_type_correct'])}% (of {det['changed_pairs']}: {per_type})", ""]
        if rep.get("object_score"):
            lines += format_object_score(rep["object_score"]) + [""]
    lines.append(f"== best over {len(report['folders'])} folder(s)")
    lines.append(f"{'split':<14}{'metric':<9}{'best':>8}  folder")
    for split in ("semantic", "non_semantic", "total"):
        for name in names:
            top = report["best"][split][name]
            where = top["folder"] if top else "-"
            lines.append(f"{split:<14}{name:<9}{_fmt(top['value'] if top else None):>8}  {where}")
    return "\n".join(lines) + "\n"


# Column heads of the object-level table (utils.object_score.FIGURES), explained in its first line.
OBJECT_COLUMNS = {"right_type": "type", "object_color_shape": "col+shape", "object_named": "named",
                  "new_value": "new", "all_right": "all"}


def format_object_score(score):
    """The object-level score as text lines: % of the changed pairs of each type ("-": nothing new to name)."""
    lines = [f"object-level score against {score['scenes']}: % of the changed pairs whose caption names the "
             f"right change type (type), a subject whose colour and shape fit the changed object (col+shape), "
             f"one all of whose named attributes fit it (named), the right new colour, material or added "
             f"object (new), and all of these (all)",
             f"{'pairs':<12}{'n':>6}" + "".join(f"{OBJECT_COLUMNS[f]:>11}" for f in FIGURES)]
    rows = [(t, score["per_type"][t]) for t in CHANGE_TYPES]
    rows.append(("changed", {"pairs": score["pairs"], **score["figures"]}))
    for name, row in rows:
        label = f"  {name}" if name in CHANGE_TYPES else name
        lines.append(f"{label:<12}{row['pairs']:>6}" + "".join(f"{_fmt(row[f]):>11}" for f in FIGURES))
    named = ", ".join(f"{a} {_fmt(v['named'])}% (right {_fmt(v['right'])}%)"
                      for a, v in score["attributes"].items())
    lines.append(f"subjects that name each attribute: {named}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description="Score generated change captions.")
    parser.add_argument("--results_dir", required=True,
                        help="folder whose subfolders hold sc_results.json and nsc_results.json")
    parser.add_argument("--anno", default=None,
                        help="COCO ground truth, e.g. data/total_change_captions_reformat.json (default: data.anno_json "
                             "of the experiment's config.yaml, when --results_dir is inside an experiment folder)")
    parser.add_argument("--type_file", default=None,
                        help="change type of every image, e.g. data/type_mapping.json (default: "
                             "data.type_mapping_json of the experiment's config.yaml, likewise)")
    parser.add_argument("--scenes", default=None,
                        help=f"scene truth for the object-level score, e.g. data/demo/{SCENES_FILE} (default: "
                             f"the {SCENES_FILE} next to --anno, when there is one; the real data has none)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        find_result_folders(args.results_dir, argv)  # a wrong --results_dir is the first thing to say
        anno, type_file = data_files(args.results_dir, args.anno, args.type_file, argv)
        scenes = args.scenes if args.scenes is not None else scenes_beside(anno)
        report = evaluate_dir(args.results_dir, anno, type_file, argv=argv, scenes=scenes)
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report["seconds"] = round(time.monotonic() - start, 2)
    text = format_report(report)
    write_text_atomic(os.path.join(args.results_dir, OUTPUT_FILES[0]), text)
    write_json_atomic(os.path.join(args.results_dir, OUTPUT_FILES[1]), report, indent=2)
    print(text, end="")
    print(f"wrote {', '.join(os.path.join(args.results_dir, n) for n in OUTPUT_FILES)} "
          f"({report['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
