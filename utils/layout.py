"""The layout of an experiment folder <exp_dir>/<exp_name>: every path a tool reads or writes there.

    config.yaml  metrics.jsonl  train_log.txt  best_snapshot.json     train.py
    snapshots/<exp_name>_checkpoint_<iteration>.pt                      train.py
    eval_sents/<exp_name>_sents_<iteration>/{sc,nsc}_results.json       train.py (validation captions)
    eval_sents/eval_results.json                                        evaluate.py (validation scores)
    test_output/captions/<split>/{sc,nsc}_results.json                  test.py
    test_output/captions/eval_results.json                              evaluate.py (test scores)
    figures/  figures/triplets.json                                     scripts/visualize.py
    report/report.md  report/report.html                               scripts/make_report.py
"""
import glob
import os
import re

CAPTION_FILES = ("sc_results.json", "nsc_results.json")  # captions of the changed and of the distractor pairs
SCORES = "eval_results.json"  # evaluate.py's scores, written inside the results folder it was given
FIGURE_INDEX = "triplets.json"
REPORT_HTML = "report.html"


class ExperimentLayout:
    """Every path inside one experiment folder, from its root."""

    # What a training run writes into its folder (train.py --overwrite removes them first).
    OUTPUTS = ("snapshots", "eval_sents", "test_output", "figures", "report", "best_snapshot.json", "metrics.jsonl",
               "train_log.txt", "config.yaml")

    def __init__(self, root, exp_name):
        self.root = root
        self.exp_name = exp_name
        self.config = os.path.join(root, "config.yaml")
        self.metrics = os.path.join(root, "metrics.jsonl")
        self.train_log = os.path.join(root, "train_log.txt")
        self.best = os.path.join(root, "best_snapshot.json")
        self.lock = os.path.join(root, ".lock")
        self.snapshots = os.path.join(root, "snapshots")
        self.val_captions = os.path.join(root, "eval_sents")
        self.val_scores = os.path.join(self.val_captions, SCORES)
        self.test_captions = os.path.join(root, "test_output", "captions")
        self.test_scores = os.path.join(self.test_captions, SCORES)
        self.figures = os.path.join(root, "figures")
        self.figure_index = os.path.join(self.figures, FIGURE_INDEX)
        self.report = os.path.join(root, "report")
        self.report_html = os.path.join(self.report, REPORT_HTML)
        self.report_md = os.path.join(self.report, "report.md")

    @classmethod
    def of(cls, cfg):
        return cls(os.path.join(cfg.exp_dir, cfg.exp_name), cfg.exp_name)

    def snapshot(self, iteration):
        return os.path.join(self.snapshots, f"{self.exp_name}_checkpoint_{iteration}.pt")

    def snapshot_iterations(self):
        """Iterations of the snapshots in the folder, ascending."""
        pattern = re.compile(re.escape(self.exp_name) + r"_checkpoint_(\d+)\.pt$")
        found = (pattern.search(os.path.basename(p)) for p in glob.glob(os.path.join(self.snapshots, "*.pt")))
        return sorted(int(m.group(1)) for m in found if m)

    def val_captions_at(self, iteration):
        return os.path.join(self.val_captions, f"{self.exp_name}_sents_{iteration}")

    def test_captions_of(self, split):
        return os.path.join(self.test_captions, split)

    @staticmethod
    def root_of_results(results_dir):
        """The experiment folder a results folder of evaluate.py belongs to (its eval_sents or its
        test_output/captions), or None for a folder elsewhere."""
        parts = os.path.normpath(os.path.abspath(results_dir)).split(os.sep)
        if parts[-1:] == ["eval_sents"]:
            return os.sep.join(parts[:-1])
        if parts[-2:] == ["test_output", "captions"]:
            return os.sep.join(parts[:-2])
        return None
