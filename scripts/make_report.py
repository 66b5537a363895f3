"""Collect one experiment into a report: scores, training curves and triplet figures.

    python scripts/make_report.py --cfg configs/dynamic/transformer.yaml \
        [--exp_dir experiments/<exp_name>] [--snapshot ITER] [--no_figures] [KEY VALUE ...]

Reads what the other tools wrote under the experiment folder (<exp_dir>/<exp_name> by default):
  eval_sents/eval_results.json          validation scores per snapshot (evaluate.py), else the
                                        "val" records of metrics.jsonl (BLEU-4 and CIDEr only)
  test_output/captions/eval_results.json  test scores (test.py, then evaluate.py)
  metrics.jsonl                         training curves
  figures/                              triplet figures; when none are there, one per change type
                                        is drawn with scripts/visualize.py
and writes report/report.md (images by relative path), report/report.html (images embedded)
and report/training_curves.png. A piece that is missing is named in the report with the command
that makes it.
"""
import argparse
import base64
import html
import json
import os
import re
import subprocess
import sys
import tempfile

import matplotlib

from configs.defaults import load_config
from utils.checkpoint import list_snapshots
from utils.cli import parse_with_overrides, report_errors, snapshot_choice
from utils.errors import UserError
from utils.fileio import read_json, write_text_atomic
from utils.layout import ExperimentLayout
from utils.object_score import FIGURE_LABELS, FIGURES
from utils.text import CHANGE_TYPES

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

VISUALIZE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "visualize.py")

SHOWN_METRICS = ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
VAL_METRICS = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
TEST_ROWS = ("total", "semantic", "non_semantic") + CHANGE_TYPES
LOSSES = ("total", "caption", "cross_view", "cross_modal")


class ReportError(UserError):
    """An input file that exists but cannot be used; the message names it."""


def _read_json(path):
    return read_json(path, "", "re-create it with the tool that wrote it (evaluate.py, train.py)", ReportError)


def _pct(value):
    return "-" if value is None else f"{100 * value:.2f}"


def _iteration_of(folder):
    match = re.search(r"(\d+)$", folder)
    return int(match.group(1)) if match else None


def read_metrics(path):
    """(train records, val records, skipped lines) of metrics.jsonl; the last record per iteration wins."""
    train, val, skipped = {}, {}, 0
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1  # a line cut short by a crash; the rest of the file is still good
                continue
            target = {"train": train, "val": val}.get(record.get("split"))
            if target is not None and "iteration" in record:
                target[record["iteration"]] = record
    return ([train[k] for k in sorted(train)], [val[k] for k in sorted(val)], skipped)


def validation_scores(layout):
    """Scores of every snapshot scored by evaluate.py: {"source", "metrics", "rows", "best"} or None."""
    path = layout.val_scores
    if not os.path.isfile(path):
        return None
    report = _read_json(path)
    try:
        rows = []
        for folder, rep in report["folders"].items():
            scores = rep["scores"]
            objects = rep.get("object_score")  # None without a scene truth (the real data)
            rows.append({"iteration": _iteration_of(folder), "folder": folder,
                         **{name: scores["total"].get(name) for name in VAL_METRICS},
                         "semantic CIDEr": scores["semantic"].get("CIDEr"),
                         "distractor CIDEr": scores["non_semantic"].get("CIDEr"),
                         "no-change rate": rep["change_detection"]["distractor_no_change"],
                         "right-type rate": rep["change_detection"]["change_type_correct"],
                         "right-object rate": objects["figures"]["object_color_shape"] if objects else None})
        top = report["best"]["total"]["CIDEr"]
    except (KeyError, TypeError, AttributeError) as err:
        raise ReportError(f"{path} lacks {err} where evaluate.py writes it; re-run evaluate.py on "
                          f"{os.path.dirname(path)}") from None
    rows.sort(key=lambda r: (r["iteration"] is None, r["iteration"] or 0))
    best = next((r for r in rows if top and r["folder"] == top["folder"]), None)
    metrics = list(VAL_METRICS) + ["semantic CIDEr", "distractor CIDEr", "no-change rate", "right-type rate"]
    if any(r["right-object rate"] is not None for r in rows):
        metrics.append("right-object rate")
    return {"source": path, "rows": rows, "best": best, "metrics": metrics}


def test_scores(layout):
    """{"source", "folder", "scores", "change_detection", "object_score" (None without a scene truth),
    "metrics", "others"} or None."""
    path = layout.test_scores
    if not os.path.isfile(path):
        return None
    report = _read_json(path)
    try:
        folders = list(report["folders"])
        if not folders:
            raise KeyError("result folders")
        folder = "test" if "test" in folders else folders[0]
        rep = report["folders"][folder]
        missing = [row for row in TEST_ROWS if row not in rep["scores"]]
        if missing:
            raise KeyError(f"the scores of {missing}")
        return {"source": path, "folder": folder, "scores": rep["scores"],
                "change_detection": rep["change_detection"], "object_score": rep.get("object_score"),
                "metrics": [m for m in SHOWN_METRICS if m in report["metrics"]],
                "others": [f for f in folders if f != folder]}
    except (KeyError, TypeError, AttributeError) as err:
        raise ReportError(f"{path} lacks {err} where evaluate.py writes it; re-run evaluate.py on "
                          f"{os.path.dirname(path)}") from None


def plot_curves(train, val, out_path):
    """Losses, logit scales, learning rate and validation scores against the iteration."""
    if not train and not val:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), dpi=100)
    (ax_loss, ax_scale), (ax_lr, ax_val) = axes
    its = [r["iteration"] for r in train]
    for name in LOSSES:
        values = [r.get(name) for r in train]
        if its and all(v is not None and v > 0 for v in values):
            ax_loss.plot(its, values, label=name, linewidth=1.8)
    ax_loss.set_yscale("log")
    ax_loss.set_title("training losses (log scale)")
    for name in ("logit_scale_encoder", "logit_scale_cbr"):
        values = [r.get(name) for r in train]
        if its and all(v is not None for v in values):
            ax_scale.plot(its, values, label=name.replace("logit_scale_", ""), linewidth=1.8)
    ax_scale.set_title("logit scales (log of 1/temperature)")
    if its and all("lr" in r for r in train):
        ax_lr.plot(its, [r["lr"] for r in train], color="tab:purple", linewidth=1.8)
        ax_lr.set_yscale("log")
    ax_lr.set_title("learning rate")
    val_its = [r["iteration"] for r in val]
    for name, marker in (("BLEU-4", "o"), ("CIDEr", "s")):
        values = [r.get(name) for r in val]
        if val_its and all(v is not None for v in values):
            ax_val.plot(val_its, [100 * v for v in values], marker=marker, label=name, linewidth=1.8)
    ax_val.set_title("validation scores x 100 (changed + distractor pairs)")
    for ax in axes.flat:
        ax.set_xlabel("iteration", fontsize=12)
        ax.title.set_fontsize(14)
        ax.tick_params(labelsize=11)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=11)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=14)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = f"{out_path}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def best_validation(layout, val_records):
    """(iteration, how it was chosen) of the best validation snapshot, or (None, None)."""
    best_file = layout.best
    if os.path.isfile(best_file):
        iteration = _read_json(best_file).get("iteration")
        if iteration is not None:
            return iteration, "best_snapshot.json: highest validation CIDEr, chosen by train.py"
    scored = [r for r in val_records if r.get("CIDEr") is not None]
    if scored:
        return max(scored, key=lambda r: r["CIDEr"])["iteration"], "highest validation CIDEr in metrics.jsonl"
    return None, None


def choose_snapshot(cfg, best):
    """The best validation snapshot when its file exists, else the latest snapshot, else None."""
    available = list_snapshots(cfg)
    if best in available:
        return best
    return available[-1] if available else None


def draw_with_visualize(cfg, snapshot, figures_dir):
    """One figure per change type (the first test scene of each) by scripts/visualize.py."""
    with tempfile.TemporaryDirectory(prefix="report-") as folder:
        cfg_file = os.path.join(folder, "config.yaml")
        with open(cfg_file, "w") as handle:
            handle.write(cfg.dump())
        done = subprocess.run([sys.executable, VISUALIZE, "--cfg", cfg_file, "--snapshot", str(snapshot),
                               "--per_type", "1", "--output_dir", figures_dir, "--attention"],
                              capture_output=True, text=True)
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        raise ReportError(errors[-1][len("error: "):] if errors else
                          f"scripts/visualize.py failed (exit {done.returncode}): {done.stderr[-1500:]}")


def figure_entries(cfg, layout, snapshot, draw):
    """(entries of triplets.json, note): draws one figure per change type when the folder has none."""
    figures_dir = layout.figures
    has_png = os.path.isdir(figures_dir) and any(n.endswith(".png") for n in os.listdir(figures_dir))
    note = ""
    if not has_png and draw:
        if snapshot is None:
            return [], "No triplet figures: the experiment has no snapshot yet (train first)."
        draw_with_visualize(cfg, snapshot, figures_dir)
        note = f"Figures drawn now from snapshot {snapshot}, the first test scene of each change type."
    if os.path.isfile(layout.figure_index):
        entries = [e for e in _read_json(layout.figure_index) if os.path.isfile(os.path.join(figures_dir, e["file"]))]
    elif has_png:
        entries = [{"file": n} for n in sorted(os.listdir(figures_dir)) if n.endswith(".png")]
    else:
        entries = []
    if not entries and not note:
        note = (f"No triplet figures in {figures_dir}; draw them with python scripts/visualize.py "
                f"--cfg CONFIG --snapshot ITER --per_type 1 --attention")
    return entries, note


def collect(cfg, snapshot=None, draw_figures=True):
    """Everything the report shows, as plain data."""
    layout = ExperimentLayout.of(cfg)
    metrics_path = layout.metrics
    train, val_records, skipped = read_metrics(metrics_path) if os.path.isfile(metrics_path) else ([], [], 0)
    val = validation_scores(layout)
    test = test_scores(layout)
    curves = plot_curves(train, val_records, os.path.join(layout.report, "training_curves.png"))
    best, best_source = best_validation(layout, val_records)
    best_snapshot = choose_snapshot(cfg, best)
    available = list_snapshots(cfg)
    chosen = {"best": best_snapshot, None: best_snapshot, "last": available[-1] if available else None}.get(
        snapshot, snapshot)
    entries, figure_note = figure_entries(cfg, layout, chosen, draw_figures)
    notes = []
    if not os.path.isfile(metrics_path):
        notes.append(f"No training log: {metrics_path} does not exist (train.py writes it).")
    if skipped:
        notes.append(f"{skipped} unreadable line(s) of {metrics_path} were skipped.")
    return {"layout": layout, "exp_root": layout.root, "report_dir": layout.report, "exp_name": cfg.exp_name,
            "train": train, "val_records": val_records, "val": val, "test": test,
            "best": best, "best_source": best_source,
            "anno": cfg.data.anno_json, "types": cfg.data.type_mapping_json, "curves": curves, "snapshot": best_snapshot,
            "figures_dir": layout.figures, "figures": entries, "figure_note": figure_note, "notes": notes}


# --------------------------------------------------------------------------- rendering

def _tables(info):
    """The report's tables as (heading, header row, rows, note) in display order."""
    tables = []
    if info["val_records"]:
        header = ["iteration", "BLEU-4", "CIDEr"]
        rows = [[str(r["iteration"]) + (" (best)" if r["iteration"] == info["best"] else ""),
                 _pct(r.get("BLEU-4")), _pct(r.get("CIDEr"))] for r in info["val_records"]]
        note = ("Scores x 100 computed by train.py at each snapshot on all validation captions "
                "(changed + distractor pairs); source metrics.jsonl.")
        if info["best"] is not None:
            note += f" Best snapshot: iteration {info['best']} ({info['best_source']})."
        tables.append(("Validation scores during training", header, rows, note))
    val = info["val"]
    if val:
        header = ["iteration"] + val["metrics"]
        rows = [[str(r["iteration"])] + [_pct(r.get(m)) for m in val["metrics"]] for r in val["rows"]]
        best = val["best"]
        note = (f"Scores x 100 on all validation captions (changed + distractor pairs) unless named; "
                f"rates in %; source {val['source']}.")
        if best:
            note += (f" Best by CIDEr: iteration {best['iteration']} (CIDEr {_pct(best['CIDEr'])}, "
                     f"BLEU-4 {_pct(best['Bleu_4'])}).")
        unscored = sorted({r["iteration"] for r in info["val_records"]} - {r["iteration"] for r in val["rows"]})
        if unscored:
            note += (f" Not yet scored by evaluate.py: iterations {', '.join(map(str, unscored))}; re-run "
                     f"evaluate.py on {os.path.dirname(val['source'])} to add them.")
        tables.append(("Validation scores per snapshot (evaluate.py, all metrics)", header, rows, note))
    test = info["test"]
    if test:
        header = ["pairs", "count"] + test["metrics"]
        rows = [[name.replace("non_semantic", "distractor"), str(test["scores"][name]["count"])]
                + [_pct(test["scores"][name][m]) for m in test["metrics"]] for name in TEST_ROWS]
        note = (f"Scores x 100 of the captions in {os.path.join(info['layout'].test_captions, test['folder'])}; source "
                f"{test['source']}. SPICE is '-' where it could not run offline. The snapshot that wrote "
                f"the captions is the one passed to test.py (usually the best on validation).")
        if test["others"]:
            note += f" Other result folders there: {', '.join(test['others'])}."
        tables.append(("Test scores", header, rows, note))
        det = test["change_detection"]
        header = ["figure", "value (%)"]
        rows = [["distractor pairs captioned 'no change'", _pct(det["distractor_no_change"])],
                ["changed pairs captioned as a change", _pct(det["change_detected"])],
                ["changed pairs captioned as the right type", _pct(det["change_type_correct"])]]
        rows += [[f"  right type: {t}", _pct(v)] for t, v in det["per_type_correct"].items()]
        note = (f"Read off the generated captions by keyword rules (utils.eval_utils.classify_caption); "
                f"{det['changed_pairs']} changed and {det['distractor_pairs']} distractor pairs.")
        tables.append(("Change detection on the test split", header, rows, note))
        objects = test["object_score"]
        if objects:
            header = ["pairs", "count"] + [f"{FIGURE_LABELS[f]} (%)" for f in FIGURES]
            rows = [[t, str(objects["per_type"][t]["pairs"])] + [_pct(objects["per_type"][t][f]) for f in FIGURES]
                    for t in CHANGE_TYPES]
            rows.append(["changed", str(objects["pairs"])] + [_pct(objects["figures"][f]) for f in FIGURES])
            named = ", ".join(f"{a} {_pct(v['named'])} % (right {_pct(v['right'])} %)"
                              for a, v in objects["attributes"].items())
            note = (f"Each caption of a changed pair read back against the scene truth {objects['scenes']} "
                    f"(utils/object_score.py, docs/evaluation.md): its subject must fit the changed object (as it "
                    f"was before the change; the added object for add) in the colour and shape it names, or in "
                    f"every attribute it names; the new value is the new colour or material, or the added object "
                    f"('-': drop and move have none); all right: right type, object and new value. Subjects that "
                    f"name each attribute: {named}.")
            tables.append(("Object-level score on the test split", header, rows, note))
    return tables


def _missing(info, cfg_path):
    notes = list(info["notes"])
    layout = info["layout"]
    if not info["val_records"] and not info["val"]:
        notes.append(f"No validation scores: neither 'val' records in {layout.metrics} nor "
                     f"{layout.val_scores}. Train past train.snapshot_interval.")
    elif not info["val"]:
        notes.append(f"Validation scored with BLEU-4 and CIDEr only: for every metric run python "
                     f"evaluate.py --results_dir {layout.val_captions} --anno {info['anno']} --type_file "
                     f"{info['types']}.")
    if not info["test"]:
        iteration = info["snapshot"] if info["snapshot"] is not None else "ITER"
        notes.append(f"No test scores yet: run python test.py --cfg {cfg_path} --snapshot {iteration}, "
                     f"then python evaluate.py --results_dir {layout.test_captions} --anno {info['anno']} "
                     f"--type_file {info['types']}.")
    if not info["curves"]:
        notes.append("No training curves: metrics.jsonl holds no records.")
    if info["figure_note"] and not info["figures"]:
        notes.append(info["figure_note"])
    return notes


def _summary_lines(info):
    lines = [f"Experiment folder: {info['exp_root']}"]
    train = info["train"]
    if train:
        speeds = [r["it_per_s"] for r in train if r.get("it_per_s")]
        last = train[-1]
        text = (f"Trained to iteration {last['iteration']} (last logged total loss {last['total']:.4f}, "
                f"caption loss {last['caption']:.4f})")
        if speeds:
            text += f"; mean speed {sum(speeds) / len(speeds):.2f} it/s"
        lines.append(text + ".")
    if info["best"] is not None:
        lines.append(f"Best validation snapshot: iteration {info['best']} ({info['best_source']}).")
    return lines


def _figure_caption(entry):
    if "change_type" not in entry:
        return entry["file"]
    # Indexes written before the object-level verdict have right/wrong for the change type only.
    changed = entry.get("changed_verdict") or ("right" if entry["changed_right"] else "wrong")
    distractor = "right" if entry["distractor_right"] else "wrong"
    return (f"scene {entry['scene_id']:06d} ({entry['split']}, snapshot {entry['snapshot']}), change type "
            f"{entry['change_type']}: changed pair \"{entry['changed_caption']}\" ({changed}); distractor "
            f"pair \"{entry['distractor_caption']}\" ({distractor})")


def render_markdown(info, cfg_path):
    out = [f"# Report: {info['exp_name']}", ""]
    out += [f"- {line}" for line in _summary_lines(info)] + [""]
    missing = _missing(info, cfg_path)
    if missing:
        out += ["## Missing pieces", ""] + [f"- {n}" for n in missing] + [""]
    for heading, header, rows, note in _tables(info):
        out += [f"## {heading}", "", "| " + " | ".join(header) + " |",
                "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in rows]
        out += ["", note, ""]
    if info["curves"]:
        rel = os.path.relpath(info["curves"], info["report_dir"])
        out += ["## Training curves", "", f"![training curves]({rel})", ""]
    if info["figures"]:
        out += ["## Triplets: before, changed and distractor images with their captions", ""]
        if info["figure_note"]:
            out += [info["figure_note"], ""]
        for entry in info["figures"]:
            rel = os.path.relpath(os.path.join(info["figures_dir"], entry["file"]), info["report_dir"])
            out += [f"![{entry['file']}]({rel})", "", _figure_caption(entry), ""]
    return "\n".join(out)


def _embed(path):
    with open(path, "rb") as handle:
        data = base64.b64encode(handle.read()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(os.path.basename(path))}">'


def render_html(info, cfg_path):
    esc = html.escape
    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">",
           f"<title>Report: {esc(info['exp_name'])}</title>",
           "<style>body{font-family:sans-serif;max-width:1550px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:.25em .6em;"
           "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
           ".note{color:#444}</style></head><body>",
           f"<h1>Report: {esc(info['exp_name'])}</h1>", "<ul>"]
    out += [f"<li>{esc(line)}</li>" for line in _summary_lines(info)] + ["</ul>"]
    missing = _missing(info, cfg_path)
    if missing:
        out += ["<h2>Missing pieces</h2>", "<ul>"] + [f"<li>{esc(n)}</li>" for n in missing] + ["</ul>"]
    for heading, header, rows, note in _tables(info):
        out += [f"<h2>{esc(heading)}</h2>", "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
                + "</tr>"]
        out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        out += ["</table>", f"<p class=\"note\">{esc(note)}</p>"]
    if info["curves"]:
        out += ["<h2>Training curves</h2>", _embed(info["curves"])]
    if info["figures"]:
        out.append("<h2>Triplets: before, changed and distractor images with their captions</h2>")
        if info["figure_note"]:
            out.append(f"<p>{esc(info['figure_note'])}</p>")
        for entry in info["figures"]:
            out += [_embed(os.path.join(info["figures_dir"], entry["file"])),
                    f"<p class=\"note\">{esc(_figure_caption(entry))}</p>"]
    out.append("</body></html>")
    return "\n".join(out)


def make_report(cfg, exp_root=None, snapshot=None, draw_figures=True, cfg_path="CONFIG"):
    """Writes report.md and report.html under <exp_root>/report; returns their paths."""
    exp_root = exp_root or os.path.join(cfg.exp_dir, cfg.exp_name)
    if not os.path.isdir(exp_root):
        raise ReportError(f"experiment folder {exp_root} does not exist; pass --exp_dir or the "
                          f"exp_dir / exp_name the experiment was trained with")
    if os.path.normpath(exp_root) != os.path.normpath(os.path.join(cfg.exp_dir, cfg.exp_name)):
        # Snapshots are looked up from the config: point it at the folder given.
        cfg = cfg.clone()
        cfg.defrost()
        cfg.exp_dir, cfg.exp_name = os.path.split(os.path.normpath(exp_root))
        cfg.freeze()
    info = collect(cfg, snapshot, draw_figures)
    os.makedirs(info["report_dir"], exist_ok=True)
    md_path, html_path = info["layout"].report_md, info["layout"].report_html
    write_text_atomic(md_path, render_markdown(info, cfg_path))
    write_text_atomic(html_path, render_html(info, cfg_path))
    return md_path, html_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="the config the experiment was trained with")
    parser.add_argument("--exp_dir", default=None, help="experiment folder (default <exp_dir>/<exp_name>)")
    parser.add_argument("--snapshot", type=snapshot_choice, default="best",
                        help="snapshot for new figures: an iteration, best (default: highest validation CIDEr) or last")
    parser.add_argument("--no_figures", action="store_true", help="do not draw figures when none exist")
    args = parse_with_overrides(parser, argv)

    def run():
        cfg = load_config(args.cfg, args.opts)
        return make_report(cfg, args.exp_dir, args.snapshot, not args.no_figures, args.cfg)

    print("wrote " + " and ".join(report_errors(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
