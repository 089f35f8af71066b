"""Traces on disk: (prompt, completion) records as JSONL, one per line, written by rejection sampling (or by
hand) and read by the SFT stage."""

from __future__ import annotations

import json
import os


def write_traces(path: str, records: list[dict]) -> str:
    """Write records as JSONL (via a temporary file, so a crash never leaves half a data set)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path


def read_traces(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no trace file at {path}: run rejection sampling first")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {number}: not a JSON object ({e}); one trace per line") from None
    return records
