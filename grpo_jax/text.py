"""Text ⇄ tokens at the host boundary: left-padded prompt batches and their widths, the ids and strings that
end a completion, and decoded completions."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable

import numpy as np

# What ends a completion in every template: the closing answer tag.
STOP_STRINGS = ("</answer>",)
# Text that commonly precedes a stop string; the tokenization of the stop string is probed after each.
_STOP_CONTEXTS = ("", "a", "1", " ", "\n", ".", ")", "42", "x ")
_MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Left-padded prompts: `tokens` int32 [B, P], `mask` int32 [B, P] (1 = real token)."""

    tokens: np.ndarray
    mask: np.ndarray
    num_truncated: int = 0


# Two bucketing rules, kept apart because they give different widths (the demo's prompts: 93 tokens, a
# training width of 96, sampled at 128 by `generate`), and a change of width changes the sampled numbers.


def bucket_length(n: int, multiple: int = 16) -> int:
    """A run's fixed width for `n` tokens (its prompts, an SFT row): `n` rounded up to a multiple of 16."""
    return max(multiple, -(-n // multiple) * multiple)


def prompt_length_bucket(length: int) -> int:
    """The width `rollout.generate` pads prompts of any width to: the next power of two, >= 16, so that a
    caller with prompts of many widths compiles the sampler once per bucket."""
    return max(_MIN_PROMPT_BUCKET, 1 << max(0, int(length) - 1).bit_length())


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


def tokenizer_eos_ids(tokenizer) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS (and the chat end-of-turn, when it has one)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token in tokenizer.get_vocab() and token_id not in ids:
            ids.append(token_id)
    return ids


def stop_sequences_for(tokenizer, strings: Iterable[str]) -> tuple[tuple[int, ...], ...]:
    """Token-id sequences that, when generated, make the text end with one of `strings`.

    For each string and each of a few typical preceding contexts, encode context + string and take the
    shortest tail of ids whose decoded text ends with the string. Contexts where the tokenizer merges
    the string with what precedes it give tails that contain context text; those are still correct
    stops, just specific. Other spellings the model may produce are caught on the host by
    `truncate_at_stop`.
    """
    found = set()
    for string in strings:
        if not string:
            raise ValueError("stop strings must be non-empty")
        for context in _STOP_CONTEXTS:
            ids = list(tokenizer.encode(context + string, add_special_tokens=False))
            for start in range(len(ids) - 1, -1, -1):
                text = tokenizer.decode(ids[start:], clean_up_tokenization_spaces=False)
                if text.endswith(string):
                    found.add(tuple(ids[start:]))
                    break
    return tuple(sorted(found))


def truncate_at_stop(text: str, strings: Iterable[str]) -> str:
    """`text` up to and including the earliest occurrence of any of `strings` (unchanged if none occurs)."""
    ends = [text.find(s) + len(s) for s in strings if s and s in text]
    return text[: min(ends)] if ends else text
