"""The R1-Zero demo's base model: a tiny transformer pretrained from scratch on the arithmetic corpus.

`ensure_demo_base_model(cache_dir, seed)` builds (or reuses) a Hugging Face checkpoint directory:

  1. a byte-level BPE tokenizer (digits split one by one, the think/answer tags as single tokens, an
     EOS) trained on the corpus and the R1-Zero template, so the template costs few tokens;
  2. the pretraining corpus of `grpo_jax.data.arithmetic` (worked solutions, unreliable shortcuts, a
     few percent in the R1-Zero template / think-answer format; held-out problems never appear);
  3. packed language-model pretraining for a FIXED number of steps (a time budget would leave a slow
     machine with a model that cannot add, and the demo's headroom depends on the arithmetic);
  4. `save_pretrained` with the tokenizer, plus `recipe.json` whose hash decides reuse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from grpo_jax.data import r1zero_template
from grpo_jax.data.arithmetic import CorpusMix, pretraining_corpus
from grpo_jax.models import ModelConfig, Transformer, save_pretrained
from grpo_jax.sft import SFTConfig, iterate_batches, pack_documents, sft_train

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
RECIPE_FILE = "recipe.json"
# Base models built by the default recipe for seeds 0-2 ship with the package (1.2 MB each).
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


@dataclasses.dataclass(frozen=True)
class DemoBaseRecipe:
    """Everything that determines the base model (its hash names the cached checkpoint)."""

    # task difficulty and corpus
    digits: int = 2
    num_operands: int = 3
    ops: tuple[str, ...] = ("+",)
    mix: CorpusMix = CorpusMix()
    num_docs: int = 56000  # about one pass at num_steps x batch_size rows of ~5 documents
    # tokenizer
    vocab_size: int = 512  # an upper bound: BPE stops early once every corpus word is one token
    # model (Llama-style, tied embeddings)
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 512
    # packed pretraining
    seq_len: int = 256  # > the longest document (a templated one, ~140 tokens): packing never cuts one
    batch_size: int = 8
    num_steps: int = 1200
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1

    def hash(self, seed: int) -> str:
        blob = json.dumps({"seed": seed, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# The distillation demo's student: the same corpus, tokenizer and steps, 0.45x the parameters (3 narrower layers).
# Its heads keep the teacher's head dim (16): with 4 heads of 12 one of three seeds never learned to copy the
# prompt's digits reliably, whatever the distillation data.
STUDENT_RECIPE = DemoBaseRecipe(hidden_size=48, intermediate_size=192, num_layers=3, num_heads=3, num_kv_heads=3)
# name -> recipe of the demo's base models; checkpoints are "{name}_seed{seed}".
DEMO_MODELS = {"demo_base": DemoBaseRecipe(), "demo_student": STUDENT_RECIPE}


# ---------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast` fitted to `texts`.

    Digits are split one by one before BPE (numbers never merge, so arithmetic is digit-wise), the
    think/answer tags are single ordinary tokens (kept by decoding, as the format reward must see them),
    and "<|endoftext|>" is the EOS token ("<|pad|>" pads).
    """
    # Imported here: transformers costs 0.5 s, which every script's --help would pay (grpo_jax.presets imports
    # this module), while only a seed without a shipped base model trains a tokenizer.
    from transformers import PreTrainedTokenizerFast

    if not 256 + len(TAG_TOKENS) + 2 < vocab_size <= 512:
        raise ValueError(f"vocab_size must be in ({256 + len(TAG_TOKENS) + 2}, 512] (256 bytes + tags + specials "
                         f"+ merges), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAG_TOKENS),
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens([AddedToken(tag, normalized=False, special=False) for tag in TAG_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


# ---------------------------------------------------------------------------------------------- model


def demo_model_config(recipe: DemoBaseRecipe, tokenizer):
    return ModelConfig(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_layers=recipe.num_layers,
        num_heads=recipe.num_heads,
        num_kv_heads=recipe.num_kv_heads,
        tie_embeddings=True,
        max_position_embeddings=recipe.max_position_embeddings,
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
    )


def pretrain_demo_base(
    recipe: DemoBaseRecipe,
    seed: int = 0,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
):
    """(model, params, tokenizer) after packed pretraining on the arithmetic corpus."""
    start = time.perf_counter()
    docs = pretraining_corpus(seed, recipe.num_docs, digits=recipe.digits, num_operands=recipe.num_operands,
                              ops=recipe.ops, mix=recipe.mix)
    # The template itself weighs in the BPE fit, so its words become single tokens.
    template_texts = [r1zero_template(f"Compute {i}+{i}") for i in range(200)]
    tokenizer = train_tokenizer(docs[:5000] + template_texts, recipe.vocab_size)
    token_lists = tokenizer(docs, add_special_tokens=False)["input_ids"]
    rows = pack_documents(token_lists, recipe.seq_len, tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    log(f"demo base: {len(docs)} documents -> {rows.tokens.shape[0]} packed rows of {recipe.seq_len} tokens "
        f"({time.perf_counter() - start:.1f}s)")

    model = Transformer(demo_model_config(recipe, tokenizer))
    params = model.init(jax.random.key(seed), std=0.02)
    config = SFTConfig(num_steps=recipe.num_steps, learning_rate=recipe.learning_rate,
                       warmup_steps=recipe.warmup_steps, weight_decay=recipe.weight_decay,
                       log_every=max(1, recipe.num_steps // 10))
    params, _ = sft_train(model, params, iterate_batches(rows, recipe.batch_size, seed=seed), config,
                       progress=progress, description="pretraining demo base",
                       metrics_callback=lambda step, m: log(f"  step {step}: loss {m['loss']:.4f} "
                                                            f"({m['steps_per_s']:.2f} steps/s)"))
    log(f"demo base: pretrained {recipe.num_steps} steps, {model.config.num_params / 1e6:.2f}M parameters "
        f"({time.perf_counter() - start:.0f}s in all)")
    return model, params, tokenizer


def demo_model_path(name: str, seed: int, cache_dir: str | os.PathLike, *, log: Callable[[str], None] = print) -> str:
    """Path of the demo model `name` ("demo_base" or "demo_student") for `seed`: the copy shipped with the
    package when its recipe matches (seeds 0-2), else one pretrained here once and cached under `cache_dir`."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; known: {', '.join(DEMO_MODELS)}")
    recipe = DEMO_MODELS[name]
    shipped = os.path.join(SHIPPED_DIR, f"{name}_seed{seed}")
    if recipe_hash_of(shipped) == recipe.hash(seed):
        return shipped
    return ensure_demo_base_model(cache_dir, seed=seed, recipe=recipe, name=name, log=log)


def ensure_demo_base_model(
    cache_dir: str | os.PathLike,
    seed: int = 0,
    recipe: DemoBaseRecipe | None = None,
    *,
    name: str = "demo_base",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> str:
    """Path of the demo checkpoint `{name}_seed{seed}` for `recipe` under `cache_dir`, pretraining it if needed.

    A directory whose `recipe.json` hash matches is reused; otherwise it is (re)built and replaced whole,
    and `recipe.json` is written last, so an interrupted build is never mistaken for a finished one.
    """
    recipe = recipe or DemoBaseRecipe()
    digest = recipe.hash(seed)
    path = os.path.join(os.fspath(cache_dir), f"{name}_seed{seed}")
    if recipe_hash_of(path) == digest:
        log(f"{name}: reusing {path}")
        return path
    model, params, tokenizer = pretrain_demo_base(recipe, seed, progress=progress, log=log)
    save_pretrained(model, params, path, tokenizer=tokenizer)  # atomic: replaces any stale directory whole
    # Written last: a checkpoint without its recipe file is never reused.
    with open(os.path.join(path, RECIPE_FILE), "w") as f:
        json.dump({"hash": digest, "seed": seed, "recipe": dataclasses.asdict(recipe)}, f, indent=2)
    log(f"{name}: saved {path}")
    return path


def recipe_hash_of(path: str) -> str | None:
    """The recipe hash a built base model directory records (None if there is none)."""
    try:
        with open(os.path.join(path, RECIPE_FILE)) as f:
            return json.load(f).get("hash")
    except (OSError, ValueError):
        return None
