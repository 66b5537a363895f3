"""An experiment folder <exp_dir>/<exp_name>: who owns it, what it holds, which snapshot to use.

A training run owns its folder for its whole life (a lock file), refuses to start over snapshots
it did not write unless told to resume or to overwrite, removes the temporary files of killed
writes, and keeps metrics.jsonl and train_log.txt to one record per iteration across resumes.
"""
import glob
import json
import os
import re
import shutil

from configs.defaults import ConfigError, load_config, shipped_configs
from utils.checkpoint import list_snapshots, snapshot_dir
from utils.errors import UserError
from utils.fileio import FileLock, write_json_atomic, write_text_atomic
from utils.layout import ExperimentLayout

LOG_LINE = re.compile(r"iter (\d+):")


class ExperimentError(UserError):
    """The experiment folder cannot be used as asked; the message says why and what to run instead."""


def check_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test.{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise ExperimentError(f"cannot write to the experiment folder {folder} ({err.strerror}); "
                              f"set exp_dir to a writable folder") from None


def check_free_space(folder, needed_bytes):
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise ExperimentError(f"only {free / 2**20:.0f} MiB free in {folder}, and a snapshot needs about "
                              f"{needed_bytes / 2**20:.0f} MiB; free some space or set exp_dir to another disk")


class Experiment:
    """The folder of one training run, owned for the run's life (use it as a context manager).

    resuming: the run continues from a snapshot, which must exist. Otherwise the folder must hold no
    snapshots, unless overwrite, which removes the earlier run's outputs (ExperimentLayout.OUTPUTS) first.
    """

    def __init__(self, cfg, resuming, overwrite=False, config_file="<config>"):
        self.cfg = cfg
        self.layout = ExperimentLayout.of(cfg)
        self.root = self.layout.root
        self.resuming, self.overwrite, self.config_file = resuming, overwrite, config_file
        self._lock = FileLock(self.layout.lock, f"the experiment folder {self.root}",
                              "another training run", "wait for it to end, or train under another exp_name", ExperimentError)

    def __enter__(self):
        check_writable(self.root)
        self._lock.acquire()
        try:
            self._remove_temporary_files()
            self._check_earlier_outputs()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def _remove_temporary_files(self):
        """Leftovers of writes cut short by a kill (atomic writes go through *.tmp* files)."""
        patterns = ("snapshots/*.tmp.*", "*.tmp", "eval_sents/*/*.tmp", "*.tmp.*")
        for path in sorted({p for pattern in patterns for p in glob.glob(os.path.join(self.root, pattern))}):
            os.remove(path)
            print(f"removed {path}, left by a write that was cut short")

    def _check_earlier_outputs(self):
        found = list_snapshots(self.cfg)
        if self.resuming:
            if not found:
                raise ExperimentError(f"--resume: no snapshot in {snapshot_dir(self.cfg)}; start without --resume")
            return
        if found and not self.overwrite:
            raise ExperimentError(
                f"{self.root} already holds snapshots ({', '.join(map(str, found))}) of an earlier run. "
                f"Continue it with --resume, train under another exp_name (e.g. exp_name {self.cfg.exp_name}_2), "
                f"or start over with --overwrite (removes its snapshots, logs and results)")
        # Outputs without snapshots belong to a run that saved nothing: they go too.
        for name in ExperimentLayout.OUTPUTS:
            path = os.path.join(self.root, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)

    # ---------------------------------------------------------------- the run's records
    def open_logs(self, start_iteration):
        """RunLog of metrics.jsonl and train_log.txt holding only the records up to start_iteration."""
        return RunLog(self.layout, start_iteration)


class RunLog:
    """metrics.jsonl (one JSON record per line) and train_log.txt (the same as text), appended to.

    Opening it keeps only the records up to start_iteration, so after a resume every iteration
    appears once.
    """

    def __init__(self, layout, start_iteration):
        self.metrics_path = layout.metrics
        self.text_path = layout.train_log
        self.records = [r for r in read_metrics(self.metrics_path) if r.get("iteration", 0) <= start_iteration]
        write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in self.records))
        kept = []
        if os.path.exists(self.text_path):
            with open(self.text_path) as handle:
                for line in handle:
                    match = LOG_LINE.match(line)
                    if not match or int(match.group(1)) <= start_iteration:
                        kept.append(line)
        write_text_atomic(self.text_path, "".join(kept))
        self._metrics = open(self.metrics_path, "a")
        self._text = open(self.text_path, "a")

    def write(self, record, line):
        self.records.append(record)
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        self._text.write(line + "\n")
        self._text.flush()

    def note(self, line):
        self._text.write(line + "\n")
        self._text.flush()

    def validated(self):
        """{iteration: validation record}."""
        return {r["iteration"]: r for r in self.records if r.get("split") == "val"}

    def close(self):
        self._metrics.close()
        self._text.close()


def read_metrics(path):
    """The records of metrics.jsonl; a line cut short by a crash is skipped."""
    records = []
    if os.path.exists(path):
        with open(path) as handle:
            for line in handle:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


def write_best(layout, best):
    """best_snapshot.json, or none when nothing has been validated."""
    path = layout.best
    if best is None:
        if os.path.exists(path):
            os.remove(path)
    else:
        write_json_atomic(path, best)


# ---------------------------------------------------------------- choosing a snapshot
def _other_experiments(cfg, config_file):
    """[(config file, root, iterations, best)] of the shipped configs whose experiment has snapshots."""
    found = []
    for path in shipped_configs():
        if config_file and os.path.abspath(path) == os.path.abspath(config_file):
            continue
        try:
            other = load_config(path, ["exp_dir", cfg.exp_dir])
        except ConfigError:
            continue
        iterations = list_snapshots(other)
        root = ExperimentLayout.of(other).root
        if iterations and root != ExperimentLayout.of(cfg).root:
            found.append((os.path.relpath(path), root, iterations, best_iteration(other)))
    return found


def best_iteration(cfg):
    """The iteration best_snapshot.json names (highest validation CIDEr), or None."""
    path = ExperimentLayout.of(cfg).best
    try:
        with open(path) as handle:
            return int(json.load(handle)["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _listing(iterations, best):
    shown = ", ".join(map(str, iterations))
    return shown + (f"; best on validation: {best}" if best is not None else "")


def resolve_snapshot(cfg, choice, config_file, command_for):
    """The iteration that --snapshot ``choice`` (an int, "best" or "last") names in cfg's experiment.

    command_for(config file, snapshot) returns the command line that would work; errors print it.
    """
    layout = ExperimentLayout.of(cfg)
    root = layout.root
    iterations = list_snapshots(cfg)
    best = best_iteration(cfg)
    if choice == "best" and best in iterations:
        return best
    if choice == "last" and iterations:
        return iterations[-1]
    if isinstance(choice, int) and choice in iterations:
        return choice
    if iterations:
        wanted = "best" if best in iterations else "last"
        why = {"best": f"{layout.best} names no snapshot that exists (no validation finished yet?)",
               "last": f"{root} holds no snapshot"}.get(choice, f"{root} has no snapshot of iteration {choice}")
        raise ExperimentError(f"{why}; its snapshots: {_listing(iterations, best)}. Use: "
                              f"{command_for(config_file, wanted)}")
    message = f"no snapshots in {root} ({config_file} trains there; train first)"
    others = _other_experiments(cfg, config_file)
    if others:
        hints = [f"{path} has snapshots in {other_root} ({_listing(its, other_best)}): "
                 f"{command_for(path, 'best' if other_best is not None else 'last')}"
                 for path, other_root, its, other_best in others]
        message += ". " + "; ".join(hints)
    raise ExperimentError(message)
