"""Text ⇄ token batches at the host boundary: left-padded prompt batches and decoded completions."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts: `tokens` int32 [B, P], `mask` int32 [B, P] (1 = real token)."""

    tokens: np.ndarray
    mask: np.ndarray
    num_truncated: int = 0


def bucket_length(n: int, multiple: int = 16) -> int:
    """Round a prompt length up so that a run sees few distinct shapes (one compile per bucket)."""
    return max(multiple, -(-n // multiple) * multiple)


def check_prompt_lengths(lengths: list[int], max_prompt_len: int, truncate: bool) -> None:
    """Without `truncate`, a prompt longer than `max_prompt_len` tokens is an error."""
    too_long = [n for n in lengths if n > max_prompt_len]
    if too_long and not truncate:
        raise ValueError(
            f"{len(too_long)} prompt(s) exceed max_prompt_len={max_prompt_len} tokens (longest {max(too_long)}): "
            "raise --max_prompt_len or allow left truncation"
        )


def encode_prompts(
    tokenizer, texts, max_prompt_len: int, *, truncate: bool = True, multiple: int = 16, width: int | None = None
) -> PromptBatch:
    """Tokenize `texts` and left-pad them to `width` (default: the bucketed longest, at most `max_prompt_len`).

    A trainer passes a fixed `width` (the bucketed longest prompt of its whole dataset) so every step
    has the same shapes and nothing recompiles.
    A prompt longer than `max_prompt_len` loses its beginning (left truncation keeps the question's end
    and the "Assistant:" cue) with a counted warning, or raises if `truncate=False`.
    """
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    check_prompt_lengths([len(x) for x in ids], max_prompt_len, truncate)
    too_long = [i for i, x in enumerate(ids) if len(x) > max_prompt_len]
    if too_long:
        warnings.warn(f"left-truncated {len(too_long)} of {len(ids)} prompts to max_prompt_len={max_prompt_len} tokens")
        ids = [x[-max_prompt_len:] for x in ids]
    longest = max(len(x) for x in ids)
    width = width or min(bucket_length(longest, multiple), max_prompt_len)
    if width < longest:
        raise ValueError(f"width {width} is shorter than the longest prompt ({longest} tokens)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = np.full((len(ids), width), pad_id, np.int32)
    mask = np.zeros((len(ids), width), np.int32)
    for row, x in enumerate(ids):
        if x:
            tokens[row, width - len(x):] = x
            mask[row, width - len(x):] = 1
    return PromptBatch(tokens, mask, len(too_long))


def decode_completions(tokenizer, tokens: np.ndarray, mask: np.ndarray, eos_ids=()) -> list[str]:
    """Text of each generated row: its masked tokens, without the stop token."""
    eos = set(int(e) for e in eos_ids)
    texts = []
    for row, row_mask in zip(np.asarray(tokens), np.asarray(mask)):
        ids = [int(t) for t, m in zip(row, row_mask) if m and int(t) not in eos]
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return texts


def completion_ids(tokens: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """Token ids of each generated row under its mask, the stop token included (TRL's `completion_ids`)."""
    return [[int(t) for t in row[row_mask.astype(bool)]] for row, row_mask in zip(np.asarray(tokens), np.asarray(mask))]
