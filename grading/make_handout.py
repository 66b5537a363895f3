"""Cut the student handout: a complete student repository with the six snippets blanked.

    python -m grading.make_handout --output DIR [--tar FILE.tar.gz]
    python -m grading.make_handout --positions      # file:line of each block in the handout

The handout holds the tracked files minus the instructor tools and docs and the tests that spell
the snippets out (grading.snippets.HANDOUT_EXCLUDE). Inside each `== To Implement ==` block the
marker and hint comments stay and the solution lines become `raise NotImplementedError("<snippet>")`.
The README loses its parts for instructors and maintainers (between `<!-- not in the handout -->`
and `<!-- end not in the handout -->`). tests/snippet_cases.pt gets the solution's outputs on
recorded inputs, and those of the known mistakes with their hints, which tests/test_snippets.py
(`make snippets`) compares the students' snippets with.
"""
import argparse
import sys

from grading import exit_status
from grading.handout import handout_positions, write_handout, write_tar


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="folder to create for the handout (must not exist)")
    parser.add_argument("--tar", help="also pack the handout into this .tar.gz")
    parser.add_argument("--positions", action="store_true",
                        help="print FILE:LINE SNIPPET for each block as it sits in the handout")
    args = parser.parse_args(argv)
    if not args.output and not args.positions:
        parser.error("give --output DIR (and optionally --tar FILE.tar.gz), or --positions")
    if args.tar and not args.output:
        parser.error("--tar packs the handout folder, so it needs --output DIR as well")

    def run():
        if args.positions:
            for rel, line, name in handout_positions():
                print(f"{rel}:{line} {name}")
        if args.output:
            files = write_handout(args.output)
            print(f"wrote {len(files)} files to {args.output}")
            if args.tar:
                write_tar(args.output, args.tar)
                print(f"packed {args.tar}")

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
