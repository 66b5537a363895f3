"""Grade student submissions of the six snippets.

    python -m grading.grade SUBMISSION [SUBMISSION ...] [--out results.csv] [--json DIR] [--timeout 60]
    python -m grading.grade --batch SUBMISSIONS_DIR --out results.csv --json reports/ --jobs 8

A SUBMISSION is a folder or .zip holding the four files students edit (models/SCORER.py,
models/CBR.py, models/transformer_decoder.py, utils/utils.py), found by name anywhere inside;
--batch DIR grades every sub-folder or .zip of DIR. Each snippet is checked on its own against
the solution's outputs and gradients recorded on hidden inputs (values, shapes, masks, dropout,
gradients), then the whole model, from the solution's initial weights, must repeat the solution's
short training run on a fixed random batch (its losses at every step, its greedy captions). Points:
15 per snippet and 10 for the training run (100 in all). Every check runs in a sandboxed child
process with --timeout seconds (docs/instructors.md, "Security"); run from the full project, on Linux.
"""
import argparse
import sys

from grading import exit_status
from grading.grader import batch_submissions, default_jobs, format_table, grade, write_csv, write_json_reports


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("submissions", nargs="*", help="folders or .zip files, one per student")
    parser.add_argument("--batch", help="a folder holding one sub-folder or .zip per student")
    parser.add_argument("--out", help="CSV file with everyone's points")
    parser.add_argument("--json", help="folder for one JSON report per submission")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per check (default 60)")
    parser.add_argument("--jobs", "--parallel", type=int, default=None, dest="jobs",
                        help=f"checks run at once, each on one core (default: the cores, here {default_jobs()})")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")

    def run():
        paths = list(args.submissions) + (batch_submissions(args.batch) if args.batch else [])
        if not paths:
            parser.error("give at least one SUBMISSION or --batch DIR")
        print(f"grading {len(paths)} submission(s)...", flush=True)
        done = []

        def progress(report):
            done.append(report)
            print(f"[{len(done)}/{len(paths)}] {report['submission']}: {report['total']}/{report['max_total']}",
                  file=sys.stderr, flush=True)

        reports = grade(paths, timeout=args.timeout, jobs=args.jobs, progress=progress)
        print(f"sandbox: {reports[0]['sandbox']}\n")
        for report in reports:
            print(format_table(report) + "\n")
        if args.json:
            write_json_reports(reports, args.json)
            print(f"wrote {len(reports)} JSON report(s) to {args.json}")
        if args.out:
            write_csv(reports, args.out)
            print(f"wrote {args.out}")

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
