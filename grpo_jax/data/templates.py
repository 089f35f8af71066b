"""Prompt templates: how a question becomes the text the model continues.

* ``r1zero``: DeepSeek-R1-Zero's template, word for word from the DeepSeek-R1 paper (Table 1), for base
  models. It ends with "Assistant:", so a well-formed completion is `` <think> … </think> <answer> … </answer>``.
* ``r1zero_think``: the same, pre-filled with " <think>" (as TinyZero pre-fills "<think>"): the completion
  starts inside the think block. Easier for small base models, which rarely open the tag on their own.
* ``compact``: a short pre-filled template for tiny models with a small context.
* ``chat`` / ``chat_think``: instruct models; the tokenizer's chat template with an instruction to use
  the tags, and the generation prompt (``chat_think`` also opens "<think>").

The format reward needs no configuration for pre-filling: `rewards.format_reward` sees that a prompt ends
with "<think>" and treats its completion as starting inside the block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from grpo_jax.data.task import batch_columns

R1ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)

CHAT_INSTRUCTION = (
    "First think through the reasoning process, then give the answer. Enclose the reasoning in <think> "
    "</think> tags and the final answer in <answer> </answer> tags, i.e., <think> reasoning process here "
    "</think> <answer> answer here </answer>."
)

THINK_PREFILL = "<think>"


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """A prompt template.

    Attributes:
      name: how it is selected (`TEMPLATES` key, or "custom").
      text: the text with a "{prompt}" placeholder; None for the tokenizer's chat template.
      prefill_think: whether the rendered prompt ends by opening the think block.
    """

    name: str
    text: str | None
    prefill_think: bool = False

    @property
    def needs_tokenizer(self) -> bool:
        return self.text is None


TEMPLATES: dict[str, PromptTemplate] = {
    "r1zero": PromptTemplate("r1zero", R1ZERO_TEMPLATE),
    "r1zero_think": PromptTemplate("r1zero_think", R1ZERO_TEMPLATE + " " + THINK_PREFILL, prefill_think=True),
    "compact": PromptTemplate("compact", "User: {prompt}\nAssistant: " + THINK_PREFILL, prefill_think=True),
    "chat": PromptTemplate("chat", None),
    "chat_think": PromptTemplate("chat_think", None, prefill_think=True),
}


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    """A `PromptTemplate` from a registered name, a custom text containing "{prompt}", or a template."""
    if isinstance(template, PromptTemplate):
        return template
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{prompt}" in template:
        return PromptTemplate("custom", template, prefill_think=template.rstrip().endswith(THINK_PREFILL))
    raise ValueError(
        f"unknown prompt template {template!r}; use one of {', '.join(TEMPLATES)} or a text containing "
        "'{prompt}'"
    )


def _question(example: dict[str, Any] | str) -> str:
    if isinstance(example, str):
        return example
    if not isinstance(example, dict) or not isinstance(example.get("prompt"), str):
        raise ValueError(f"an example must be a str or a dict with a str 'prompt', got {str(example)[:120]!r}")
    return example["prompt"]


def prompt_messages(template: str | PromptTemplate, example: dict[str, Any] | str) -> list[dict[str, str]] | None:
    """The prompt as chat messages (TRL's conversational form) under a chat template; None under a text one."""
    if not get_template(template).needs_tokenizer:
        return None
    return [{"role": "user", "content": f"{_question(example)}\n\n{CHAT_INSTRUCTION}"}]


def _render_chat(template: PromptTemplate, example, tokenizer) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the chat templates need a tokenizer with a chat_template (an instruct model's); for a base model "
            "use template='r1zero'"
        )
    messages = prompt_messages(template, example)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Some chat templates (e.g. DeepSeek-R1's distilled models) already open the think block.
    if template.prefill_think and not text.rstrip().endswith(THINK_PREFILL):
        text += THINK_PREFILL
    return text


def render_prompt(template: str | PromptTemplate, example: dict[str, Any] | str, tokenizer=None) -> str:
    """The text the model continues for one example (a dict with "prompt", or the question itself)."""
    template = get_template(template)
    if template.needs_tokenizer:
        return _render_chat(template, example, tokenizer)
    # str.replace, not str.format: custom template texts may hold literal braces.
    return template.text.replace("{prompt}", _question(example))


def reward_inputs(template: str | PromptTemplate, examples: Sequence[dict[str, Any]], prompts: Sequence[str],
                  completions: Sequence[str], num_samples: int) -> dict[str, Any]:
    """`rewards.compute_rewards`' prompts, completions and columns for `num_samples` completions per example
    (completion i*k+j is sample j of example i, `prompts` the rendered ones), in the form TRL gives them.

    Under a chat template they are conversational: the prompt's messages and the assistant's message, whose
    content is the whole turn (a "<think>" the prompt pre-filled, then the completion). Otherwise the
    rendered prompt and the completion text.
    """
    k = num_samples
    columns = batch_columns(examples, repeat=k)
    if not get_template(template).needs_tokenizer:
        return {"prompts": [p for p in prompts for _ in range(k)], "completions": list(completions), "columns": columns}
    turn_starts = [p[p.rfind(THINK_PREFILL):] if p.rstrip().endswith(THINK_PREFILL) else "" for p in prompts]
    return {
        "prompts": [prompt_messages(template, example) for example in examples for _ in range(k)],
        "completions": [[{"role": "assistant", "content": turn_starts[i // k] + text}]
                        for i, text in enumerate(completions)],
        "columns": columns,
    }


def r1zero_template(prompt: str) -> str:
    """The question in DeepSeek-R1-Zero's template (shorthand for ``render_prompt("r1zero", prompt)``)."""
    return render_prompt("r1zero", prompt)
