"""GSM8K grade-school math word problems, read offline.

Two sources, tried in this order:

1. `data_path`: GSM8K-format JSONL (``{"question": ..., "answer": "<worked solution>\\n#### 72"}``, as in
   github.com/openai/grade-school-math): a file (eval carved from it) or a directory holding `train.jsonl`
   and, optionally, `test.jsonl` (the eval split).
2. tensorflow-datasets' `gsm8k` builder, when tfds is installed (the `data` extra) and the data set is
   already prepared under `data_dir` (or tfds' default directory). tfds is imported lazily; its
   `data_source` reads the prepared array_record files without TensorFlow.

Each example: ``{"prompt": question, "answer": the number after "####" (commas dropped), "solution":
the worked solution without its calculator annotations}``.
"""

from __future__ import annotations

import os
import re
from typing import Any

from grpo_jax.data.jsonl import read_jsonl
from grpo_jax.data.task import Example, Task, question_answer_task, split_examples

HOW_TO_PROVIDE = (
    "pass data_path=<a GSM8K .jsonl file, or a directory with train.jsonl and test.jsonl> (lines like "
    '{"question": ..., "answer": "... #### 72"}, from github.com/openai/grade-school-math), or install '
    "tensorflow-datasets (pip install 'grpo_jax[data]') and prepare its gsm8k data set (then data_dir=...)"
)
_CALCULATOR_ANNOTATION_RE = re.compile(r"<<[^<>]*>>")


def _text(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def parse_gsm8k_record(record: dict[str, Any], where: str) -> Example:
    """An example from one GSM8K record (`question`, `answer` ending in "#### N"); str or bytes fields."""
    question, answer = _text(record.get("question")), _text(record.get("answer"))
    if not isinstance(question, str) or not isinstance(answer, str):
        raise ValueError(f"{where}: a GSM8K record needs string 'question' and 'answer' fields, got "
                         f"{sorted(record)}")
    if "####" not in answer:
        raise ValueError(f"{where}: the GSM8K 'answer' must end with '#### <number>', got {answer[-60:]!r}")
    solution, _, final = answer.rpartition("####")
    return {
        "prompt": question.strip(),
        "answer": final.strip().replace(",", ""),
        "solution": _CALCULATOR_ANNOTATION_RE.sub("", solution).strip(),
    }


def read_gsm8k_jsonl(path: str | os.PathLike) -> list[Example]:
    """The examples of a GSM8K-format JSONL file."""
    path = os.fspath(path)
    return [parse_gsm8k_record(r, f"{path} record {i}") for i, r in enumerate(read_jsonl(path))]


def _read_local(data_path: str | os.PathLike) -> tuple[list[Example], list[Example] | None]:
    """(examples, eval examples or None) from a JSONL file or a train.jsonl / test.jsonl directory."""
    data_path = os.fspath(data_path)
    if os.path.isdir(data_path):
        train_file, test_file = os.path.join(data_path, "train.jsonl"), os.path.join(data_path, "test.jsonl")
        if not os.path.isfile(train_file):
            raise FileNotFoundError(f"no train.jsonl in {data_path}; {HOW_TO_PROVIDE}")
        return read_gsm8k_jsonl(train_file), read_gsm8k_jsonl(test_file) if os.path.isfile(test_file) else None
    if not os.path.isfile(data_path):
        raise FileNotFoundError(f"no GSM8K data at {data_path}; {HOW_TO_PROVIDE}")
    return read_gsm8k_jsonl(data_path), None


def _read_tfds(data_dir: str | None) -> tuple[list[Example], list[Example]]:
    """(train, test) examples from tensorflow-datasets' prepared gsm8k data (no download is attempted)."""
    try:  # imported here: tensorflow-datasets is optional (the `data` extra), one way of several to get GSM8K
        import tensorflow_datasets as tfds
        from tensorflow_datasets.text.gsm8k import gsm8k  # noqa: F401  (importing registers the builder)
    except ImportError:
        raise FileNotFoundError(f"GSM8K needs local data and tensorflow-datasets is not installed: "
                                f"{HOW_TO_PROVIDE}") from None
    splits = []
    for split in ("train", "test"):
        try:
            source = tfds.data_source("gsm8k", split=split, data_dir=data_dir, download=False)
        except Exception as error:  # tfds raises assorted errors for data that was never prepared
            raise FileNotFoundError(f"tensorflow-datasets has no prepared gsm8k {split} split "
                                    f"({type(error).__name__}: {error}); {HOW_TO_PROVIDE}") from None
        splits.append([parse_gsm8k_record(source[i], f"tfds gsm8k {split}[{i}]") for i in range(len(source))])
    return splits[0], splits[1]


def load_gsm8k_task(
    data_path: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    num_train: int | None = None,
    num_eval: int | None = None,
    data_dir: str | None = None,
) -> Task:
    """GSM8K: local JSONL if `data_path` is given, else tfds' prepared data; format + accuracy rewards."""
    examples, test = _read_local(data_path) if data_path is not None else _read_tfds(data_dir)
    train, evals = split_examples(examples, seed=seed, num_train=num_train, num_eval=num_eval, eval_examples=test)
    return question_answer_task("gsm8k", train, evals)
