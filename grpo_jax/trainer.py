"""The GRPO training loop: rollout → rewards → advantages → compiled update, with eval, logs and checkpoints.

    summary = train(TrainConfig(model="path/to/hf_dir", task="arithmetic", steps=100))

Every step is a pure function of (state, step): the prompts come from a seeded permutation indexed by the
step, and the sampling key is `fold_in(seed key, step)`. So a run resumed from a checkpoint of step s
repeats exactly what an uninterrupted run does after s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from grpo_jax import rewards as reward_lib
from grpo_jax.checkpoint import Checkpointer, abstract_with_shardings, resume_advice, sigterm_caught
from grpo_jax.data import render_prompt, reward_inputs
from grpo_jax.evaluate import EvalConfig, evaluate
from grpo_jax.grpo import GRPOConfig
from grpo_jax.lora import LoraConfig, with_adapter
from grpo_jax.memory import needs_remat
from grpo_jax.metrics import MetricsWriter, log_evaluation, plot_metrics
from grpo_jax.optim import OptimizerConfig, make_optimizer
from grpo_jax.rollout import SamplingConfig, make_generate_fn
from grpo_jax.runs import (
    FINAL_DIR,
    Preempted,
    check_finite,
    check_output_dir,
    config_differences,
    export_policy,
    load_run_inputs,
    prepare_output_dir,
    prompt_width,
    run_config,
    write_json,
)
from grpo_jax.sharding import (
    batch_sharding,
    check_batch_divisible,
    host_to_global,
    is_main_process,
    make_mesh,
    parse_mesh,
    process_local_slice,
    to_host,
)
from grpo_jax.step import GroupLayout, headline_metrics, init_training, loss_targets, reward_metrics, train_batch
from grpo_jax.text import (
    STOP_STRINGS,
    completion_ids,
    decode_completions,
    encode_prompts,
    stop_sequences_for,
    tokenizer_eos_ids,
    truncate_at_stop,
)

# Changing these between a run and its resumption is allowed; any other config change is refused.
_RESUMABLE_FIELDS = ("steps", "eval_every", "save_every", "overwrite", "eval_before", "remat", "grpo.num_microbatches",
                     "resume_step", "max_consecutive_skips", "max_zero_reward_steps", "lora.merged_rollout")
# A run resumed from a chosen earlier step (`resume_step`) takes another path from there: it may also change
# the optimizer (a lower learning rate after a divergence).
_BRANCH_FIELDS = tuple(f"optim.{field.name}" for field in dataclasses.fields(OptimizerConfig))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one GRPO run needs. See experiments/r1zero.py for the command-line flags."""

    model: str
    output_dir: str = "runs/r1zero"
    task: str = "arithmetic"
    data: str | None = None
    task_options: dict = dataclasses.field(default_factory=dict)
    # The task's own rewards unless given: registered names, import paths ("trl.rewards.think_format_reward")
    # or callables, each weighted 1.0 unless `reward_weights` says otherwise.
    reward_funcs: tuple | None = None
    reward_weights: tuple[float, ...] | None = None
    num_train: int | None = None
    num_eval: int | None = 200
    template: str = "r1zero"
    seed: int = 0
    steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 8
    max_prompt_len: int = 256
    truncate_prompts: bool = True
    max_new_tokens: int = 64
    top_p: float = 1.0
    top_k: int = 0
    dtype: str = "float32"
    # recompute attention in the backward (Transformer.remat); None: on where one row's activations would not
    # fit the device's budget without it (`memory.needs_remat`)
    remat: bool | None = None
    lora: LoraConfig = LoraConfig()  # rank 0: full fine-tune; else train an adapter on the frozen base
    grpo: GRPOConfig = GRPOConfig()
    optim: OptimizerConfig = OptimizerConfig()
    mesh: str = "data=-1"
    eval: EvalConfig = EvalConfig()
    eval_before: bool = True
    eval_every: int = 0
    save_every: int = 50
    keep_checkpoints: int = 3
    checkpoint_dir: str | None = None  # default OUTPUT_DIR/checkpoints; on a pod, shared storage (gs://...)
    ref_refresh_every: int = 0  # R1-style: replace the reference with the policy every N steps (0: never)
    max_consecutive_skips: int = 5  # updates in a row with a non-finite loss, gradient or result: stop
    # Steps in a row whose every group is tied at reward 0 (no signal, no update: a collapsed policy): stop.
    # 0 turns the check off.
    max_zero_reward_steps: int = 20
    skip_zero_advantage_updates: bool = True
    resume_step: int | None = None  # resume from this checkpoint (deleting later ones) instead of the latest
    overwrite: bool = False

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare samples of one prompt), got {self.group_size}")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "max_prompt_len", "max_consecutive_skips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_zero_reward_steps < 0 or (self.resume_step is not None and self.resume_step < 0):
            raise ValueError(f"max_zero_reward_steps ({self.max_zero_reward_steps}) and resume_step "
                             f"({self.resume_step}) must be >= 0")
        check_finite(self.to_dict())
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        for spec in self.reward_funcs or ():
            reward_lib.get_reward_fn(spec)  # an unknown name or an unimportable path fails here, before any work
        if self.lora.enabled and self.ref_refresh_every:
            raise ValueError("ref_refresh_every needs a full fine-tune: with LoRA the reference is the frozen base "
                             "model (the adapter switched off); drop --ref_refresh_every or --lora_rank")

    @property
    def temperature(self) -> float:
        """The rollouts' sampling temperature: GRPOConfig's, since the training log-probs must use the
        distribution the samples came from."""
        return self.grpo.temperature

    @property
    def rows_per_step(self) -> int:
        """Completions per GRPO step: every prompt's group."""
        return self.prompts_per_step * self.group_size

    def to_dict(self) -> dict:
        # Reward functions are recorded by name or import path (a callable may not even be copyable).
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        config = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in config.items()}
        if self.reward_funcs is not None:
            config["reward_funcs"] = [reward_lib.reward_spec(fn) for fn in self.reward_funcs]
        return config

    def resumable_fields(self) -> tuple[str, ...]:
        """The config fields a resumption may change (more when it resumes from a chosen step)."""
        return _RESUMABLE_FIELDS + (_BRANCH_FIELDS if self.resume_step is not None else ())


# ---------------------------------------------------------------------------------------------- run setup


def prompt_order(num_examples: int, seed: int, position: int, count: int) -> np.ndarray:
    """Indices of the `count` examples at data position `position`: seeded reshuffle every epoch."""
    indices = []
    for pos in range(position, position + count):
        epoch, offset = divmod(pos, num_examples)
        indices.append(np.random.default_rng([seed, epoch]).permutation(num_examples)[offset])
    return np.asarray(indices)


class Trainer:
    """Holds the compiled programs and the run's state; `run()` is the loop."""

    def __init__(self, config: TrainConfig):
        self.config = config
        cfg = config
        self.mesh = make_mesh(parse_mesh(cfg.mesh))
        check_batch_divisible(cfg.prompts_per_step, self.mesh, "prompts per step")
        self.layout = GroupLayout(cfg.prompts_per_step, cfg.group_size,
                                  process_local_slice(cfg.rows_per_step, self.mesh))
        cfg.grpo.check_rows(self.layout.num_rows)
        self.task, self.model, params, self.tokenizer = load_run_inputs(cfg)
        self.prompt_width = prompt_width(cfg, self.task, self.tokenizer)
        if self.prompt_width + cfg.max_new_tokens > self.model.config.max_position_embeddings:
            raise ValueError(
                f"prompts of {self.prompt_width} tokens + max_new_tokens {cfg.max_new_tokens} exceed the model's "
                f"context ({self.model.config.max_position_embeddings}): lower --max_prompt_len or --max_new_tokens"
            )
        self.eos_ids = tuple(tokenizer_eos_ids(self.tokenizer))
        if cfg.remat is None:
            remat = needs_remat(self.model.config, self.prompt_width + cfg.max_new_tokens,
                                jnp.dtype(self.model.dtype).itemsize, self.mesh.devices.flat[0])
            self.model = dataclasses.replace(self.model, remat=remat)

        # With LoRA the state trains the adapter; the base params stay frozen and are also the reference.
        setup = init_training(self.model, params, cfg.grpo, make_optimizer(cfg.optim), self.mesh, cfg.seed)
        self.state, self.ref_params = setup.state, setup.ref_params
        self.state_shardings, self.param_shardings = setup.state_shardings, setup.param_shardings
        self.update, self._rollout_params = setup.update, setup.rollout_params
        self.sampling = SamplingConfig(
            group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_p=cfg.top_p, top_k=cfg.top_k, eos_ids=self.eos_ids,
            stop_sequences=stop_sequences_for(self.tokenizer, STOP_STRINGS),
        )
        self.generate = make_generate_fn(self.model, self.sampling, mesh=self.mesh)
        # The run really starts here: every input is checked, so a failed start has written nothing.
        if cfg.checkpoint_dir:
            check_checkpoint_dir(cfg)
        prepare_output_dir(cfg.output_dir, cfg.to_dict(), overwrite=cfg.overwrite, resumable=cfg.resumable_fields(),
                           reads=(cfg.model,))
        self.checkpointer = Checkpointer(cfg.checkpoint_dir or os.path.join(cfg.output_dir, "checkpoints"),
                                         save_every=cfg.save_every,
                                         keep=cfg.keep_checkpoints)
        self.writer = MetricsWriter(cfg.output_dir, enabled=is_main_process())
        self.step = 0
        self._preempted = False

    def policy_params(self):
        """The policy's weights for sampling: with LoRA the adapter merged into the base, or the adapter on
        the base (`LoraConfig.merged_rollout`)."""
        if not self.config.lora.enabled:
            return self.state.params
        return self._rollout_params(self.ref_params, self.state.params)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_state(self) -> dict:
        ckpt = {"train": self.state}
        if self.config.ref_refresh_every and self.ref_params is not None:
            ckpt["ref_params"] = self.ref_params
        return ckpt

    def save(self, force: bool = False) -> None:
        metadata = {"step": self.step, "data_position": self.step * self.config.prompts_per_step,
                    "rng": {"seed": self.config.seed, "fold_in": "step"}, "config": run_config(self.config.to_dict())}
        self.checkpointer.save(self.step, self._checkpoint_state(), metadata, force=force)

    def maybe_resume(self) -> bool:
        step = self.config.resume_step
        if step is None:
            step = self.checkpointer.latest_step()
            if step is None:
                return False
        target = self._checkpoint_state()
        shardings = {"train": self.state_shardings}
        if "ref_params" in target:
            shardings["ref_params"] = self.param_shardings
        restored, metadata = self.checkpointer.restore(step, abstract_with_shardings(target, shardings))
        self.checkpointer.delete_after(step)  # a later step of the abandoned path would be resumed next time
        self.state = restored["train"]
        if "ref_params" in restored:
            self.ref_params = restored["ref_params"]
        self.step = int(metadata["step"])
        return True

    # ------------------------------------------------------------------ one step

    def _step_examples(self, step: int) -> list[dict]:
        cfg = self.config
        order = prompt_order(len(self.task.train), cfg.seed, step * cfg.prompts_per_step, cfg.prompts_per_step)
        local = order[process_local_slice(cfg.prompts_per_step, self.mesh)]
        return [self.task.train[i] for i in local]

    def _rollout(self, step: int, examples: list[dict]):
        cfg = self.config
        texts = [render_prompt(cfg.template, ex, self.tokenizer) for ex in examples]
        batch = encode_prompts(self.tokenizer, texts, cfg.max_prompt_len, truncate=cfg.truncate_prompts,
                               width=self.prompt_width)
        sharding = batch_sharding(self.mesh, 2)
        shape = (cfg.prompts_per_step, self.prompt_width)
        prompts = host_to_global(batch.tokens, sharding, shape)
        prompt_mask = host_to_global(batch.mask, sharding, shape)
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        out = self.generate(self.policy_params(), prompts, prompt_mask, key)
        return texts, batch, out

    def _trainer_state(self) -> reward_lib.TrainerState:
        return reward_lib.TrainerState(global_step=self.step, max_steps=self.config.steps)

    def _rewards(self, texts, examples, tokens, mask):
        cfg = self.config
        completions = [truncate_at_stop(t, STOP_STRINGS)
                       for t in decode_completions(self.tokenizer, tokens, mask, self.eos_ids)]
        inputs = dict(**reward_inputs(cfg.template, examples, texts, completions, cfg.group_size),
                      completion_ids=completion_ids(tokens, mask), trainer_state=self._trainer_state())
        result = reward_lib.compute_rewards(self.task.reward_fns, self.task.reward_weights, **inputs)
        metric_fns = self.task.metric_fns
        extra = reward_lib.compute_rewards(metric_fns, [1.0] * len(metric_fns), **inputs).per_function
        return result, extra

    def train_step(self) -> dict:
        cfg = self.config
        start = time.perf_counter()
        examples = self._step_examples(self.step)
        texts, prompts, out = self._rollout(self.step, examples)
        tokens, comp_mask = to_host(out.tokens), to_host(out.mask)
        rollout_s = time.perf_counter() - start
        tokens, comp_mask = tokens[self.layout.local_rows], comp_mask[self.layout.local_rows]
        result, extra = self._rewards(texts, examples, tokens, comp_mask)
        targets = loss_targets(result.total, tokens, comp_mask, self.layout, cfg.grpo, cfg.max_new_tokens,
                               self.eos_ids, scored=result.scored)
        sampling_logps = out.logps if cfg.grpo.old_logps_from_sampler else None
        batch = train_batch(self.layout, prompts.tokens, prompts.mask, tokens, targets, self.mesh, sampling_logps)
        all_zero = not np.any(multihost_utils.process_allgather(np.abs(targets.advantages).max()) > 0)
        if all_zero and cfg.skip_zero_advantage_updates:
            # Only the KL term would move the policy, and Adam would blow it up into a full-size step.
            update_metrics = {"skipped_zero_advantage": 1}
        else:
            self.state, update_metrics = self.update(self.state, self.ref_params, batch)
            update_metrics = {k: float(to_host(v)) for k, v in update_metrics.items()}
        step_s = time.perf_counter() - start

        gathered = lambda x: np.asarray(multihost_utils.process_allgather(np.asarray(x, np.float64), tiled=True))
        lengths = gathered(targets.lengths)
        metrics = reward_metrics(gathered(targets.rewards), lengths,
                                 {name: gathered(v) for name, v in result.per_function.items()},
                                 {name: gathered(v) for name, v in extra.items()}, self.layout)
        metrics = {
            **metrics,
            "rollout_tokens_per_s": float(lengths.sum() / max(rollout_s, 1e-9)),
            "rollout_s": rollout_s,
            "step_time_s": step_s,
            **update_metrics,
        }
        return {**metrics, **headline_metrics(metrics, result.per_function)}

    # ------------------------------------------------------------------ the loop

    def evaluate(self) -> dict:
        cfg = self.config
        return evaluate(self.model, self.policy_params(), self.tokenizer, self.task.eval, self.task,
                        template=cfg.template, config=cfg.eval, max_prompt_len=cfg.max_prompt_len,
                        prompt_width=self.prompt_width, mesh=self.mesh, trainer_state=self._trainer_state())

    def run(self) -> dict:
        cfg = self.config
        started = time.perf_counter()
        resumed = self.maybe_resume()
        before_path = os.path.join(cfg.output_dir, "eval_before.json")
        eval_before = None
        if cfg.eval_before and self.task.eval:
            if resumed and os.path.exists(before_path):
                with open(before_path) as f:
                    eval_before = json.load(f)
            else:
                eval_before = self.evaluate()
                write_json(before_path, eval_before)
            log_evaluation("before training", eval_before)
        guard = CollapseGuard(cfg.max_consecutive_skips, cfg.max_zero_reward_steps)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="GRPO", disable=not is_main_process())
        with sigterm_caught(self._on_sigterm), bar:  # training and its last save finish the step they are in
            while self.step < cfg.steps and not self._preempted:
                metrics = self.train_step()
                self.step += 1
                collapse = guard.update(self.step, metrics)
                if cfg.ref_refresh_every and self.ref_params is not None and self.step % cfg.ref_refresh_every == 0:
                    self.ref_params = jax.tree.map(jnp.copy, self.state.params)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps and not collapse:
                    metrics.update({f"eval/{k}": v for k, v in self.evaluate().items()})
                self.writer.write(self.step, metrics)
                if collapse:
                    self.checkpointer.wait()
                    advice = resume_advice(self.checkpointer, guard.good_until)
                    raise FloatingPointError(f"{collapse} at step {self.step}; {advice}")
                if not guard.stalled:  # unchanged weights: saving them would only rotate out an earlier step
                    self.save()
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", len=f"{metrics['completion_length/mean']:.0f}")
            self.save(force=True)
            self.checkpointer.wait()
        if self._preempted:
            raise Preempted(self.step, self.checkpointer.directory)
        eval_after = self.evaluate() if self.task.eval else None
        log_evaluation("after training", eval_after)
        self.export(os.path.join(cfg.output_dir, FINAL_DIR))
        summary = {
            "eval_before": eval_before,
            "eval_after": eval_after,
            "steps": self.step,
            "wall_s": time.perf_counter() - started,
            "update_compiles": self.update.trace_count,
        }
        write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
        if is_main_process():
            metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
            if os.path.exists(metrics_path):
                plot_metrics(metrics_path, os.path.join(cfg.output_dir, "training_curves.png"))
        self.writer.close()
        return summary

    def export(self, out_dir: str) -> None:
        """The policy as a Hugging Face checkpoint with its tokenizer (servable by the usual engines); with
        LoRA the merged weights, and the adapter alone in PEFT's format in OUTPUT_DIR/adapter/ (`export_policy`)."""
        params = with_adapter(self.ref_params, self.state.params) if self.config.lora.enabled else self.state.params
        export_policy(self.model, params, self.tokenizer, out_dir, base_model=self.config.model)

    def _on_sigterm(self) -> None:
        """Preemption: finish the current step, save it, exit cleanly (the loop checks the flag)."""
        self._preempted = True


class CollapseGuard:
    """Counts the steps in a row that did not train: updates skipped as non-finite, and steps whose every
    group is tied at reward 0 (nothing to learn from: the policy has collapsed). `update` returns why the run
    must stop, or "" while it may go on; `good_until` is then the last step whose weights are good."""

    def __init__(self, max_non_finite: int, max_zero_reward: int):
        self.max_non_finite, self.max_zero_reward = max_non_finite, max_zero_reward
        self.non_finite = self.zero_reward = 0
        self.last_scoring_step = 0
        self.good_until = 0

    @property
    def stalled(self) -> bool:
        return bool(self.non_finite or self.zero_reward)

    def update(self, step: int, metrics: dict) -> str:
        self.non_finite = self.non_finite + 1 if metrics.get("skipped", 0) else 0
        tied_at_zero = metrics["frac_zero_variance_groups"] == 1 and metrics["reward/mean"] == 0
        self.zero_reward = self.zero_reward + 1 if tied_at_zero else 0
        if not tied_at_zero:
            self.last_scoring_step = step
        if self.non_finite >= self.max_non_finite:
            self.good_until = step  # skipped updates changed nothing: the weights are those of the last update
            return (f"the policy diverged: {self.non_finite} updates in a row had a non-finite loss, gradient or "
                    "result (skipped)")
        if self.max_zero_reward and self.zero_reward >= self.max_zero_reward:
            # Step s samples from the weights of step s - 1: those of the last step that scored were still good.
            self.good_until = self.last_scoring_step - 1
            return (f"the policy collapsed: {self.zero_reward} steps in a row scored reward 0 on every sample (no "
                    "update; --max_zero_reward_steps 0 turns this check off)")
        return ""


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) GRPO training as configured; returns the summary written to summary.json. Raises
    `Preempted` after saving when SIGTERM stops it."""
    # At the door, before any loading; the run directory is written only once the run starts (in Trainer).
    check_output_dir(config.output_dir, config.to_dict(), overwrite=config.overwrite,
                     resumable=config.resumable_fields(), reads=(config.model,))
    trainer = Trainer(config)
    try:
        return trainer.run()
    finally:
        trainer.checkpointer.close()


def check_checkpoint_dir(config: TrainConfig) -> None:
    """The checkpoints of another run (another config) in --checkpoint_dir are refused, not resumed."""
    with Checkpointer(config.checkpoint_dir) as checkpointer:
        if checkpointer.latest_step() is None:
            return
        saved = checkpointer.metadata().get("config")
    differs = config_differences(saved, config.to_dict(), config.resumable_fields()) if saved else []
    if differs:
        raise ValueError(f"--checkpoint_dir {config.checkpoint_dir} holds the checkpoints of another run "
                         f"({', '.join(differs)} differ): pick another --checkpoint_dir")
