"""Atomic writes: a file is written under a temporary name, then renamed, so it is never half-written."""
import json
import os


def write_text_atomic(path, text):
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "w") as handle:
        handle.write(text)
    os.replace(tmp_path, path)


def write_json_atomic(path, data, indent=1):
    write_text_atomic(path, json.dumps(data, indent=indent))
