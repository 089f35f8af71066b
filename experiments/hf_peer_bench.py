"""The PyTorch / Hugging Face peer of `benchmark.py`: the same random Qwen2 shape and workload, on the GPU
when there is one (else the CPU).

    python experiments/hf_peer_bench.py --random_model qwen2.5-0.5b --group_size 16 --max_new_tokens 512 \
        --num_minibatches 4

What TRL's GRPOTrainer runs when it does not use vLLM, in two timed parts:
  * rollout: `model.generate` (transformers' default dynamic KV cache, SDPA attention) samples
    num_prompts x group_size rows of exactly max_new_tokens (EOS suppressed), prompts repeated G times;
  * update: a reference forward without gradients, then per minibatch the policy forward (logits of the
    completion positions only, as TRL's `logits_to_keep`), the per-token log-probs and backward, once per
    micro-batch (gradients accumulated), and a fused AdamW step. The loss is the mean completion log-prob: the GRPO loss' elementwise terms cost nothing next to it.
FLOP rates use the model-FLOP formulas of `grpo_jax.flops`, as benchmark.py's; `peak_gflops` is a bf16/fp32 matmul measured here.
The last line printed is one JSON object. Needs torch and transformers (the `test` extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from grpo_jax.flops import Workload, rollout_bytes, rollout_flops, update_flops
from grpo_jax.grpo import GRPOConfig
from grpo_jax.models import ModelConfig
from grpo_jax.synthetic import add_workload_flags, parse_random_model, random_prompts


def hf_model(c: ModelConfig, dtype: torch.dtype, device: str) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        tie_word_embeddings=True, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        eos_token_id=list(c.eos_token_ids), pad_token_id=c.pad_token_id, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def peak_gflops(dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    a, b = (torch.randn(size, size, device=DEVICE, dtype=dtype) for _ in range(2))
    a @ b
    return 2 * size**3 / min(timed(lambda: a @ b) for _ in range(repeats)) / 1e9


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_flags(p, dtype="bfloat16")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each part, after one warm-up")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    c = parse_random_model(args.random_model)
    # PyTorch has no memory-based choice: one micro-batch unless --num_microbatches says otherwise.
    grpo = GRPOConfig(beta=args.beta, num_minibatches=args.num_minibatches, num_microbatches=args.num_microbatches or 1)
    w = Workload(args.num_prompts, args.group_size, args.prompt_len, args.max_new_tokens, grpo)
    model = hf_model(c, dtype, DEVICE)
    reference = hf_model(c, dtype, DEVICE).eval() if grpo.uses_reference else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)

    prompts, prompt_mask = random_prompts(np.random.default_rng(0), w.num_prompts, w.prompt_len, c.vocab_size,
                                          c.pad_token_id)
    ids = torch.tensor(np.repeat(prompts, w.group_size, 0), device=DEVICE)
    mask = torch.tensor(np.repeat(prompt_mask, w.group_size, 0), device=DEVICE)

    def rollout():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, max_new_tokens=w.max_new_tokens, min_new_tokens=w.max_new_tokens)

    sequences = rollout()
    full_mask = torch.cat([mask, torch.ones_like(sequences[:, w.prompt_len:])], dim=1)

    def completion_logps(net, rows):
        logits = net(input_ids=sequences[rows], attention_mask=full_mask[rows],
                     logits_to_keep=w.max_new_tokens + 1).logits[:, :-1].float()
        return logits.log_softmax(-1).gather(-1, sequences[rows, w.prompt_len:, None]).squeeze(-1)

    def update():
        """Per minibatch (an optimizer step) its micro-batches' forward + backward, gradients accumulated."""
        parts = w.grpo.num_minibatches * w.grpo.num_microbatches
        row_ids = torch.arange(w.rows, device=DEVICE)
        micro = [[row_ids[m + w.grpo.num_minibatches * k :: parts] for k in range(w.grpo.num_microbatches)]
                 for m in range(w.grpo.num_minibatches)]
        if reference is not None:
            with torch.no_grad():
                for rows in (rows for minibatch in micro for rows in minibatch):
                    completion_logps(reference, rows)
        for minibatch in micro:
            for rows in minibatch:
                (-completion_logps(model, rows).mean() / w.grpo.num_microbatches).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    rollout_s = statistics.median([timed(rollout) for _ in range(args.repeats + 1)][1:])
    update_s = statistics.median([timed(update) for _ in range(args.repeats + 1)][1:])
    peak = peak_gflops(dtype, 8192 if DEVICE == "cuda" else 2048)
    tokens = w.rows * w.max_new_tokens
    update_gflops = update_flops(c, w) / update_s / 1e9
    result = {
        "rollout_time_s": rollout_s,
        "rollout_tokens_per_s": tokens / rollout_s,
        "rollout_gflops": rollout_flops(c, w) / rollout_s / 1e9,
        "rollout_bandwidth_gbs": rollout_bytes(c, w, dtype.itemsize) / rollout_s / 1e9,
        "update_time_s": update_s,
        "update_gflops": update_gflops,
        "update_mfu": update_gflops / peak,
        "peak_gflops": peak,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else None,
        "workload": vars(args),
        "machine": {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
