"""Instructor tooling: cut the student handout and grade submissions of the six snippets.

Nothing here ships to students (see ``grading.snippets.HANDOUT_EXCLUDE``).
"""


class GradingError(Exception):
    """Bad input for the handout or grading tools; the message says what and how to fix it."""
