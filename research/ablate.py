"""Does each part of the method earn its place? Trains variants x seeds on a synthetic data set.

    python research/ablate.py                                  # 4 variants x 3 seeds, the demo's data
    python research/ablate.py --viewpoint_shift 2 --variants subtraction scorer_cbr --seeds 1 \
        --section shift-2                                      # stronger distractors, one seed
    python research/ablate.py --test_scenes 2000               # the same runs, tested on 2,000 other scenes
    python research/ablate.py --smoke --workdir /tmp/ablate    # two variants, a few steps (tests)

Each run is a normal experiment (configs/dynamic/transformer_demo.yaml with the variant's keys)
under <workdir>/experiments/ablation/<section>/<variant>-s<seed>: train.py, then test.py on the
best validation snapshot, then evaluate.py on its test captions (with the object-level score of
utils/object_score.py). A run whose evaluation exists is skipped and an interrupted training
resumes, so the command can simply be run again; a trained run evaluated by an older version
(no object-level score) or on another test split is tested and evaluated again, not retrained.
The data set is the demo's (data/demo) for --viewpoint_shift 1, else data/ablation/shift-<S>,
built like the demo's (utils/synthetic_data.py) when it is absent.

The test split is the data set's own (200 scenes for 2,000) unless --test_scenes N: then N other
scenes (ids from 100000, the same renderer, distractor strength and features), all in the test
split of their own folder data/ablation/test-<N>[-shift-<S>]. With 200 changed pairs one
percentage has a sampling error of about 3.5 points (at 50 %), with 2,000 about 1.1.

The variants (the paper's ablation, Tu et al. 2023, table 3), as config keys:
  subtraction     no SCORER blocks: ReLU([X_bef; X_aft - X_bef] W + b), no L_cv, no CBR
  reconstruction  SCORER's cross-attention reconstruction without the matching loss (lambda_v 0), no CBR
  scorer          SCORER: reconstruction + the MTM InfoNCE loss L_cv, no CBR (lambda_m 0)
  scorer_cbr      SCORER + CBR: the default configuration

Writes a table (mean +- standard deviation over seeds) and a bar chart with error bars into
--out (default docs/ablation.md, between markers of the --section, so hand-written text around
them stays) and a PNG next to it.
"""
import argparse
import math
import os
import subprocess
import sys
import time

import matplotlib

from utils import synthetic_data
from utils.errors import UserError
from utils.fileio import read_json, write_json_atomic, write_text_atomic
from utils.layout import ExperimentLayout
from utils.text import CHANGE_TYPES

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "dynamic", "transformer_demo.yaml")
VARIANTS = {
    "subtraction": (["model.change_detector.encoder", "subtraction", "train.lambda_m", "0.0"],
                    "subtraction: ReLU([X_bef; X_aft - X_bef] W + b), no SCORER, no CBR"),
    "reconstruction": (["train.lambda_v", "0.0", "train.lambda_m", "0.0"],
                       "reconstruction without matching (lambda_v 0), no CBR"),
    "scorer": (["train.lambda_m", "0.0"], "SCORER: reconstruction + matching, no CBR (lambda_m 0)"),
    "scorer_cbr": ([], "SCORER + CBR (the default configuration)"),
}
METRICS = (("CIDEr", "total CIDEr"), ("Bleu_4", "BLEU-4"), ("right_type", "right change type %"),
           ("no_change", "distractor 'no change' %"), ("right_object", "right object %"),
           ("all_right", "type, object and value right %"))
TEST_START_ID = 100000  # first scene id of a --test_scenes set: no id, hence no scene, of the training data
SMOKE = {"variants": ["subtraction", "scorer_cbr"], "seeds": [1], "num_scenes": 25,
         "overrides": ["train.max_iter", "2", "data.train.batch_size", "4"]}


class Run:
    """One variant x seed: its experiment folder and the commands that make it."""

    def __init__(self, args, variant, seed):
        self.variant, self.seed = variant, seed
        self.name = f"{variant}-s{seed}"
        self.exp_dir = os.path.join(args.workdir, "experiments", "ablation", args.section)
        self.layout = ExperimentLayout(os.path.join(self.exp_dir, self.name), self.name)
        self.test_data = args.test_data
        self.test_name = os.path.relpath(args.test_data, args.workdir)  # recorded in the summary
        settings = (["exp_dir", self.exp_dir, "exp_name", self.name, "seed", str(seed), "logger.visdom", "False",
                     "gpu_id", "-1"] + VARIANTS[variant][0] + args.overrides)
        self.overrides = synthetic_data.data_overrides(args.data) + settings
        self.test_overrides = synthetic_data.data_overrides(args.test_data) + settings
        self.summary_file = os.path.join(self.layout.root, "ablation_run.json")

    def previous(self):
        """The summary of an earlier execution, or None."""
        return read_json(self.summary_file, "the run's summary") if os.path.exists(self.summary_file) else None

    def done(self):
        """Evaluated on this test split (summaries written before the object-level score name none)."""
        summary = self.previous()
        return summary is not None and summary.get("test_data") == self.test_name

    def trained(self):
        return os.path.exists(self.layout.best) and self._finished_training()

    def execute(self, log):
        started, previous = time.time(), self.previous()
        trained_before = self.trained()
        if not trained_before:
            resume = ["--resume"] if self.layout.snapshot_iterations() else []
            _run([sys.executable, os.path.join(ROOT, "train.py"), "--cfg", CONFIG, *resume, *self.overrides],
                 log, f"{self.name}: train")
        best = read_json(self.layout.best, "the best snapshot's file")["iteration"]
        _run([sys.executable, os.path.join(ROOT, "test.py"), "--cfg", CONFIG, "--snapshot", str(best),
              *self.test_overrides], log, f"{self.name}: test")
        # The scenes.json next to the annotations gives the object-level score.
        _run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--results_dir", self.layout.test_captions,
              "--anno", os.path.join(self.test_data, "total_change_captions_reformat.json"),
              "--type_file", os.path.join(self.test_data, "type_mapping.json")], log, f"{self.name}: evaluate")
        test = read_json(self.layout.test_scores, "the test scores")["folders"]["test"]
        # A run tested again keeps the minutes of its training run.
        seconds = previous["seconds"] if trained_before and previous else round(time.time() - started, 1)
        summary = {"variant": self.variant, "seed": self.seed, "best_iteration": best, "seconds": seconds,
                   "test_data": self.test_name, "test_pairs": test["scores"]["semantic"]["count"], **metrics_of(test)}
        write_json_atomic(self.summary_file, summary)
        return summary

    def _finished_training(self):
        with open(self.layout.config) as handle:
            max_iter = next(int(line.split(":")[1]) for line in handle if line.strip().startswith("max_iter:"))
        return max_iter in self.layout.snapshot_iterations()


def _run(command, log, what):
    log.write(f"\n$ {' '.join(command)}\n")
    log.flush()
    done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        raise UserError(f"{what} failed (exit {done.returncode}); its output is in {log.name}")


def metrics_of(test):
    """The figures the table shows, from one folder of evaluate.py's eval_results.json (scores x 100;
    None where the split has no caption of a kind)."""
    scores, detection = test["scores"], test["change_detection"]
    objects = test["object_score"]  # evaluate.py reads the scenes.json next to the data set's annotations

    def pct(value):
        return None if value is None else 100 * value

    found = {"CIDEr": pct(scores["total"]["CIDEr"]), "Bleu_4": pct(scores["total"]["Bleu_4"]),
             "semantic_CIDEr": pct(scores["semantic"]["CIDEr"]), "right_type": pct(detection["change_type_correct"]),
             "no_change": pct(detection["distractor_no_change"]),
             # right object: the colour and shape the caption's subject names fit the changed object
             "right_object": pct(objects["figures"]["object_color_shape"]),
             "all_right": pct(objects["figures"]["all_right"])}
    for change in CHANGE_TYPES:
        found[f"CIDEr_{change}"] = pct(scores[change]["CIDEr"])
        found[f"right_object_{change}"] = pct(objects["per_type"][change]["object_color_shape"])
    return found


def mean_std(values):
    """(mean, sample standard deviation or None for one value) of the values that are not None."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _cell(values):
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def _paired_cell(differences):
    """Mean ± standard deviation of paired differences, with the count of positive ones, e.g. "4.0 ± 5.4 (2/3 > 0)"."""
    known = [d for d in differences if d is not None]
    if not known:
        return "-"
    return f"{_cell(known)} ({sum(d > 0 for d in known)}/{len(known)} > 0)"


def tables(summaries, variants, seeds):
    """Markdown tables: main figures, per change type, paired differences against the first variant."""
    by = {(s["variant"], s["seed"]): s for s in summaries}
    lines = ["| variant | " + " | ".join(label for _, label in METRICS) + " | runs |",
             "|---|" + "---:|" * (len(METRICS) + 1)]
    for variant in variants:
        runs = [by[(variant, seed)] for seed in seeds if (variant, seed) in by]
        if runs:
            lines.append(f"| {variant} | " + " | ".join(_cell([r[key] for r in runs]) for key, _ in METRICS)
                         + f" | {len(runs)} |")
    for keys, last, text in (
            ("CIDEr_", "semantic_CIDEr", "CIDEr per change type (changed pairs of that type only; see "
                                         "docs/evaluation.md on why these are not comparable with the total):"),
            ("right_object_", "right_object", "Right object per change type, % (the colour and shape the caption "
                                              "names fit the changed object; docs/evaluation.md):")):
        lines += ["", text, "", "| variant | " + " | ".join(CHANGE_TYPES) + " | changed pairs |",
                  "|---|" + "---:|" * (len(CHANGE_TYPES) + 1)]
        for variant in variants:
            runs = [by[(variant, seed)] for seed in seeds if (variant, seed) in by]
            if runs:
                columns = [keys + c for c in CHANGE_TYPES] + [last]
                lines.append(f"| {variant} | " + " | ".join(_cell([r[k] for r in runs]) for k in columns) + " |")
    base = variants[0]
    paired = []
    for variant in variants[1:]:
        seeds_both = [seed for seed in seeds if (variant, seed) in by and (base, seed) in by]
        if seeds_both:
            diffs = {key: [None if None in (by[(variant, s)][key], by[(base, s)][key])
                           else by[(variant, s)][key] - by[(base, s)][key] for s in seeds_both] for key, _ in METRICS}
            paired.append(f"| {variant} − {base} | " + " | ".join(_paired_cell(diffs[k]) for k, _ in METRICS)
                          + f" | {len(seeds_both)} |")
    if paired:
        lines += ["", f"Differences to {base} on the same seed (the same data order), mean ± standard "
                  f"deviation over seeds, and on how many seeds the difference is positive:", "",
                  "| comparison | " + " | ".join(label for _, label in METRICS) + " | seeds |",
                  "|---|" + "---:|" * (len(METRICS) + 1)] + paired
    lines += ["", "Every run (test split):", "",
              "| run | best val. snapshot | " + " | ".join(label for _, label in METRICS) + " | minutes |",
              "|---|---:|" + "---:|" * (len(METRICS) + 1)]
    for s in sorted(summaries, key=lambda s: (variants.index(s["variant"]), s["seed"])):
        lines.append(f"| {s['variant']} s{s['seed']} | {s['best_iteration']} | "
                     + " | ".join("-" if s[k] is None else f"{s[k]:.1f}" for k, _ in METRICS)
                     + f" | {s['seconds'] / 60:.1f} |")
    return lines


def chart(summaries, variants, seeds, path, title):
    by = {(s["variant"], s["seed"]): s for s in summaries}
    shown = [v for v in variants if any((v, seed) in by for seed in seeds)]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, (key, label) in zip(axes, (METRICS[0], METRICS[2], METRICS[3], METRICS[4])):
        stats = [mean_std([by[(v, s)][key] for s in seeds if (v, s) in by]) for v in shown]
        means = [m or 0.0 for m, _ in stats]
        errors = [sd or 0.0 for _, sd in stats]
        ax.bar(range(len(shown)), means, yerr=errors, capsize=5, color="#4c72b0")
        for i, v in enumerate(shown):  # the single runs as dots
            values = [by[(v, s)][key] for s in seeds if (v, s) in by and by[(v, s)][key] is not None]
            ax.plot([i] * len(values), values, "k.", markersize=5)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(shown, rotation=20)
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_section(out, section, text):
    """Puts text between the section's markers in out (replacing what was there), or appends it."""
    begin, end = f"<!-- ablate.py section {section}: begin -->", f"<!-- ablate.py section {section}: end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    current = open(out).read() if os.path.exists(out) else "# Ablation on the synthetic data\n\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        current = head + block + ("\n" + after if after else "")
    else:
        current = current.rstrip("\n") + "\n\n" + block
    write_text_atomic(out, current)


def ensure_data(folder, num_scenes, viewpoint_shift, log, test_only=False):
    """Builds a data set like the demo's where absent; test_only: scenes from id TEST_START_ID, all of them in
    the test split (its vocabulary is then empty of words: test.py decodes with the snapshot's own).

    Random-weight features re-estimate BatchNorm on the first 256 images of their folder: calibrated on
    other scenes, the demo's features moved by 1.9 % (relative norm, 100 test images), against 40 % from a
    scene to its distractor image, so a test set of its own is extracted as the training data was."""
    if all((synthetic_data.generated(folder), synthetic_data.preprocessed(folder),
            *(synthetic_data.extracted(folder, i, f) for i, f in synthetic_data.IMAGE_FOLDERS))):
        return
    print(f"building the data set {folder} ({num_scenes} scenes, viewpoint shift {viewpoint_shift})", flush=True)
    if not synthetic_data.generated(folder):
        command = synthetic_data.generate_command(folder, num_scenes, viewpoint_shift=viewpoint_shift)
        _run(command + (["--start_id", str(TEST_START_ID)] if test_only else []), log, "generate")
    if test_only:
        splits_file = os.path.join(folder, "splits.json")
        splits = read_json(splits_file, "the split file")
        write_json_atomic(splits_file, {"train": [], "val": [], "test": sorted(sum(splits.values(), []))})
    synthetic_data.check_feature_settings(folder, f"rm -r {folder}")
    for images, features in synthetic_data.IMAGE_FOLDERS:
        if not synthetic_data.extracted(folder, images, features):
            _run(synthetic_data.extract_command(folder, images, features), log, "extract")
    if not synthetic_data.preprocessed(folder):
        _run(synthetic_data.preprocess_command(folder), log, "preprocess")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--viewpoint_shift", type=float, default=1.0,
                        help="distractor strength of the data set (scripts/generate_synthetic_clevr.py)")
    parser.add_argument("--data", help="data folder (default: data/demo, or data/ablation/shift-<S>)")
    parser.add_argument("--num_scenes", type=int, default=2000, help="scenes of a data set built here")
    parser.add_argument("--test_scenes", type=int, default=None,
                        help="test every run on this many other scenes (a data set of their own, built once; "
                             "2000 gives a sampling error of about one point per percentage) instead of the "
                             "data set's test split")
    parser.add_argument("--section", help="name of this comparison in --out and of its runs' folder "
                                          "(default: shift-<S>)")
    parser.add_argument("--workdir", default=ROOT, help="folder that receives data/ and experiments/")
    parser.add_argument("--out", help="Markdown file to write (default docs/ablation.md; --smoke: <workdir>/ablation.md)")
    parser.add_argument("--smoke", action="store_true", help="two variants, one seed, 25 scenes, 2 steps")
    parser.add_argument("overrides", nargs="*", help="KEY VALUE config overrides for every run")
    args = parser.parse_args(argv)
    if len(args.overrides) % 2:
        parser.error(f"config overrides come in KEY VALUE pairs; got {args.overrides}")
    if args.test_scenes is not None and args.test_scenes < len(CHANGE_TYPES):
        parser.error(f"--test_scenes must be at least {len(CHANGE_TYPES)} (one scene per change type); "
                     f"got {args.test_scenes}")
    if args.smoke:
        args.variants, args.seeds, args.num_scenes = SMOKE["variants"], SMOKE["seeds"], SMOKE["num_scenes"]
        args.overrides = SMOKE["overrides"] + args.overrides
    args.workdir = os.path.abspath(args.workdir)
    args.section = args.section or ("smoke" if args.smoke else f"shift-{args.viewpoint_shift:g}")
    default_data = ("data/demo" if args.viewpoint_shift == 1.0 and not args.smoke
                    else f"data/ablation/{args.section}")
    args.data = os.path.abspath(args.data or os.path.join(args.workdir, default_data))
    shift = "" if args.viewpoint_shift == 1.0 else f"-shift-{args.viewpoint_shift:g}"
    args.test_data = (os.path.join(args.workdir, "data", "ablation", f"test-{args.test_scenes}{shift}")
                      if args.test_scenes else args.data)
    args.out = args.out or (os.path.join(args.workdir, "ablation.md") if args.smoke
                            else os.path.join(ROOT, "docs", "ablation.md"))
    return args


def main(argv=None):
    args = parse_args(argv)
    command = " ".join(["python research/ablate.py", *(argv if argv is not None else sys.argv[1:])])
    runs = [Run(args, variant, seed) for variant in args.variants for seed in args.seeds]
    log_dir = os.path.join(args.workdir, "experiments", "ablation", args.section)
    os.makedirs(log_dir, exist_ok=True)
    try:
        with open(os.path.join(log_dir, "ablate_log.txt"), "a") as log:
            ensure_data(args.data, args.num_scenes, args.viewpoint_shift, log)
            if args.test_data != args.data:
                ensure_data(args.test_data, args.test_scenes, args.viewpoint_shift, log, test_only=True)
            summaries, started = [], time.time()
            for index, run in enumerate(runs, 1):
                todo = [r for r in runs[index - 1:] if not r.done()]
                status = ("done before, skipped" if run.done() else
                          f"trained before, testing on {run.test_name} ({len(todo)} to go)" if run.trained() else
                          f"running ({len(todo)} to go)")
                print(f"[{index}/{len(runs)}] {run.name}: {status}", flush=True)
                if run.done():
                    summaries.append(run.previous())
                    continue
                summary = run.execute(log)
                summaries.append(summary)
                right_object = "-" if summary["right_object"] is None else f"{summary['right_object']:.1f}"
                print(f"    CIDEr {summary['CIDEr']:.1f}, right type {summary['right_type']:.1f} %, right object "
                      f"{right_object} %, distractors 'no change' {summary['no_change']:.1f} % "
                      f"({summary['seconds'] / 60:.1f} min; {(time.time() - started) / 60:.0f} min so far)", flush=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    png = os.path.splitext(args.out)[0] + f"_{args.section}.png"
    title = f"{args.section}: {len(args.seeds)} seed(s), viewpoint shift {args.viewpoint_shift:g}"
    chart(summaries, args.variants, args.seeds, png, title)
    test_pairs = sorted({s["test_pairs"] for s in summaries})
    text = [f"### {args.section}", "",
            f"Data: {os.path.relpath(args.data, args.workdir)} (viewpoint shift {args.viewpoint_shift:g}); "
            f"test split: {os.path.relpath(args.test_data, args.workdir)} "
            f"({' / '.join(map(str, test_pairs))} changed and as many distractor pairs); "
            f"variants: {', '.join(args.variants)}; seeds: {', '.join(map(str, args.seeds))}; config "
            f"configs/dynamic/transformer_demo.yaml" + (f" with {' '.join(args.overrides)}" if args.overrides else ""),
            "", f"Reproduce: `{command}`", "", *tables(summaries, args.variants, args.seeds), "",
            f"![{args.section}]({os.path.relpath(png, os.path.dirname(args.out))})"]
    write_section(args.out, args.section, "\n".join(text))
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
