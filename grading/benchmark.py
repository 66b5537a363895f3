"""How long grading takes at course size: grades generated submissions and prints the seconds.

    python -m grading.benchmark --submissions 50 --jobs 2

The submissions are made from the solution in this project: correct ones, partly wrong ones (one to
three known mistakes of grading/mistakes.py) and broken ones (a syntax error, a file that crashes on
import, a missing file, the untouched handout), in the proportions 2 : 2 : 1. The grader runs once
on all of them (python -m grading.grade does the same); the start (recording the hidden cases,
starting the sandbox) is timed apart from the checks, so the cost of N submissions on J cores is
about start + N x (check seconds per submission) / J.
"""
import argparse
import os
import random
import shutil
import tempfile
import time

from grading import REPO
from grading import mistakes as known
from grading.grader import default_jobs, grade
from grading.snippets import assignment_blocks, blank_text, read_text
from utils.assignment import ASSIGNMENT_FILES

BROKEN = ("syntax error", "crash on import", "missing file", "untouched handout")


def generate(folder, count, seed=0):
    """``count`` submissions under ``folder``; returns {name: kind}."""
    rng = random.Random(seed)
    solution = {rel: read_text(os.path.join(REPO, rel)) for rel in ASSIGNMENT_FILES}
    blocks = assignment_blocks(REPO)
    owner = {block.name: rel for rel, found in blocks.items() for block in found}
    kinds = {}
    for index in range(count):
        texts, skip = dict(solution), set()
        kind = ("correct", "partly wrong", "broken")[(0, 0, 1, 1, 2)[index % 5]]
        if kind == "partly wrong":
            for mistake in rng.sample(known.MISTAKES, rng.randint(1, 3)):
                name = rng.choice(sorted(mistake.edits))
                texts[owner[name]] = known.apply(mistake, name, texts[owner[name]], owner[name])
        elif kind == "broken":
            kind = BROKEN[index // 5 % len(BROKEN)]
            rel = rng.choice(ASSIGNMENT_FILES)
            if kind == "syntax error":
                texts[rel] = texts[rel].replace("):\n", ")\n", 1)
            elif kind == "crash on import":
                texts[rel] += "\nraise RuntimeError('crash on import')\n"
            elif kind == "missing file":
                skip.add(rel)
            else:
                texts = {r: blank_text(text, blocks[r]) for r, text in texts.items()}
        name = f"student{index:03d}"
        for rel, text in texts.items():
            if rel not in skip:
                os.makedirs(os.path.join(folder, name, os.path.dirname(rel)), exist_ok=True)
                with open(os.path.join(folder, name, rel), "w", encoding="utf-8") as handle:
                    handle.write(text)
        kinds[name] = kind
    return kinds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submissions", type=int, default=50, help="how many to generate (default 50)")
    parser.add_argument("--jobs", type=int, default=None, help=f"checks at once (default: the cores, here {default_jobs()})")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per check (default 60)")
    args = parser.parse_args(argv)
    if args.submissions < 1:
        parser.error("--submissions must be at least 1")
    jobs = args.jobs or default_jobs()
    folder = tempfile.mkdtemp(prefix="grading-benchmark-")
    try:
        kinds = generate(folder, args.submissions)
        paths = [os.path.join(folder, name) for name in sorted(kinds)]
        started = time.monotonic()
        reports = grade(paths, timeout=args.timeout, jobs=jobs)
        total = time.monotonic() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    check_seconds = sum(check.get("seconds", 0.0) for report in reports for check in report["checks"])
    per_submission = check_seconds / len(reports)
    start = total - check_seconds / jobs
    print(f"{len(reports)} submissions ({', '.join(f'{k}: {list(kinds.values()).count(k)}' for k in sorted(set(kinds.values())))})"
          f" graded in {total:.1f} s with --jobs {jobs}: {total / len(reports):.2f} s per submission")
    print(f"checks: {check_seconds:.1f} s of child time, {per_submission:.2f} s per submission; "
          f"start and judging: {start:.1f} s")
    for cores in (2, 4, 8, 16):
        estimate = start + 300 * per_submission / cores
        print(f"300 submissions on {cores:2d} cores (--jobs {cores}): about {estimate / 60:.1f} min")
    totals = {}
    for report in reports:
        totals.setdefault(kinds[report["submission"]], []).append(report["total"])
    print("scores: " + "; ".join(f"{kind} {min(v)}-{max(v)}" for kind, v in sorted(totals.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
