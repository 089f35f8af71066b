"""Any local question/answer data set: a JSONL or Parquet file with a prompt column and an answer column.

Column names are configurable (`prompt_column`, `answer_column`); every other column is kept and reaches
the reward functions. A row whose answer is null has no reference answer (accuracy scores it None).
Held-out eval comes from `eval_path`, or else is carved from `data_path` (see `task.split_examples`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from grpo_jax.data.task import Example, Task, question_answer_task, split_examples


def _check_exists(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file at {path}: give the path of a .jsonl or .parquet file")
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per non-blank line."""
    path = _check_exists(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number} is not valid JSON ({error.msg}): one object per line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number} holds a {type(record).__name__}, not a JSON object")
            records.append(record)
    return records


def read_parquet(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a Parquet file as dicts (needs pyarrow)."""
    path = _check_exists(path)
    try:  # imported here: pyarrow is optional (the `data` extra), needed only for Parquet files
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or convert it to JSONL)") from None
    return pq.read_table(path).to_pylist()


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a .parquet file, or of a JSONL file (any other extension)."""
    return read_parquet(path) if os.fspath(path).endswith(".parquet") else read_jsonl(path)


def records_to_examples(records: list[dict[str, Any]], prompt_column: str, answer_column: str,
                        source: str) -> list[Example]:
    """Examples ``{"prompt", "answer", ...other columns}`` from rows holding the two named columns."""
    if not records:
        raise ValueError(f"{source} has no rows")
    columns = sorted(set().union(*records))
    for column in (prompt_column, answer_column):
        if column not in columns:
            raise ValueError(f"{source} has no column {column!r} (columns: {columns}); set prompt_column / "
                             "answer_column to the right names")
    examples = []
    for i, record in enumerate(records):
        prompt, answer = record.get(prompt_column), record.get(answer_column)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{source} row {i}: {prompt_column!r} must be a non-empty string, got {prompt!r}")
        extra = {k: v for k, v in record.items() if k not in (prompt_column, answer_column)}
        examples.append({**extra, "prompt": prompt, "answer": None if answer is None else str(answer)})
    return examples


def load_jsonl_task(
    data_path: str | os.PathLike | None,
    *,
    seed: int = 0,
    num_train: int | None = None,
    num_eval: int | None = None,
    eval_path: str | os.PathLike | None = None,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
) -> Task:
    """A question/answer task from local files; format + accuracy rewards (weights 1, 1)."""
    if data_path is None:
        raise ValueError("the jsonl task needs data_path=<a .jsonl or .parquet file with prompt and answer columns>")

    def load(path) -> list[Example]:
        return records_to_examples(read_records(path), prompt_column, answer_column, os.fspath(path))

    train, evals = split_examples(
        load(data_path), seed=seed, num_train=num_train, num_eval=num_eval,
        eval_examples=None if eval_path is None else load(eval_path),
    )
    return question_answer_task("jsonl", train, evals)
