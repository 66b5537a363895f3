"""Reading JSON with a clear error, and atomic writes: a file is written under a temporary name, then
renamed, so it is never half-written."""
import json
import os

from utils.errors import UserError


def read_json(path, what, fix="", error=UserError):
    """The JSON value in path; ``error`` naming ``what`` (e.g. "data.vocab_json =") and path when the file
    is missing or not JSON, followed by ``fix`` (what to do about it)."""
    name = f"{what} {path}".strip()
    suffix = f"; {fix}" if fix else ""
    if not os.path.isfile(path):
        raise error(f"{name} does not exist{suffix}")
    try:
        with open(path) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{name} is not valid JSON ({err}){suffix}") from None


def write_text_atomic(path, text):
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "w") as handle:
        handle.write(text)
    os.replace(tmp_path, path)


def write_json_atomic(path, data, indent=1):
    write_text_atomic(path, json.dumps(data, indent=indent))
