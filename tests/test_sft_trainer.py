"""The SFT stage: traces re-tokenized by the student, a sharded run equal to one device, exact resumption,
non-finite steps, the run directory (metrics, plot, export that reloads with identical logits), --init_from,
and what a run directory refuses (another run's config, deleting what is not a run, non-finite exports)."""

import dataclasses
import json
import os
import shutil
import stat

import jax
import numpy as np
import pytest
from conftest import needs_devices

from grpo_jax.checkpoint import Checkpointer
from grpo_jax.demo_base import SHIPPED_DIR, train_tokenizer
from grpo_jax.lora import LoraConfig
from grpo_jax.models import ModelConfig, Transformer, load_pretrained, load_tokenizer, save_pretrained
from grpo_jax.optim import make_optimizer
from grpo_jax.data.traces import read_traces, write_traces
from grpo_jax.runs import config_differences, export_policy, prepare_output_dir, resolve_init
from grpo_jax.sft import SFTConfig, iterate_batches, pack_documents, sft_train
from grpo_jax.sft_trainer import SFTRunConfig, run_sft, sft_examples
from grpo_jax.sharding import make_mesh, parse_mesh

TEACHER_DIR = os.path.join(SHIPPED_DIR, "demo_base_seed0")
TINY = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   tie_embeddings=True, max_position_embeddings=64)
RECORDS = [
    {"question": f"Compute {a}+{b}", "prompt": f"Q: Compute {a}+{b}. A:",
     "completion": f" <think> {a}+{b}={a + b}. </think> <answer> {a + b} </answer>", "answer": str(a + b)}
    for a, b in [(12, 30), (7, 8), (45, 45), (99, 1), (3, 60), (21, 22)] * 4
]


@pytest.fixture(scope="module")
def teacher_tokenizer():
    return load_tokenizer(TEACHER_DIR)


def test_traces_are_retokenized_from_text_by_the_students_tokenizer(teacher_tokenizer):
    # A student with another vocabulary: ids differ from the teacher's, the text is the same.
    student_tokenizer = train_tokenizer([r["prompt"] + r["completion"] for r in RECORDS] * 3, vocab_size=300)
    token_lists, masks = sft_examples(RECORDS[:2], student_tokenizer)
    for record, ids, mask in zip(RECORDS, token_lists, masks):
        prompt_ids = student_tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        completion_ids = student_tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        assert ids == prompt_ids + completion_ids
        assert mask == [0.0] * len(prompt_ids) + [1.0] * len(completion_ids)
        assert student_tokenizer.decode(ids) == record["prompt"] + record["completion"]
    teacher_ids, _ = sft_examples(RECORDS[:1], teacher_tokenizer)
    assert teacher_ids[0] != token_lists[0]


def test_template_rerenders_prompts_from_the_question(teacher_tokenizer):
    (ids,), (mask,) = sft_examples(RECORDS[:1], teacher_tokenizer, template="r1zero")
    prompt = teacher_tokenizer.decode([t for t, m in zip(ids, mask) if m == 0])
    assert prompt.startswith("A conversation between User and Assistant") and "Compute 12+30" in prompt


def test_bad_traces_or_tokenizer_are_clear_errors(teacher_tokenizer):
    no_eos = train_tokenizer(["abc 123"] * 10, vocab_size=300)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="tokenizer has no EOS token"):
        sft_examples(RECORDS[:1], no_eos)
    with pytest.raises(ValueError, match="trace 0 lacks 'prompt'/'completion'"):
        sft_examples([{"question": "q"}], teacher_tokenizer)


# ---------------------------------------------------------------------------------------------- the training loop


def tiny_rows():
    docs = [[3, 4, 5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 3, 4]] * 8
    return pack_documents(docs, seq_len=16, eos_id=2)


LORA = LoraConfig(rank=4, alpha=8.0)


def train(steps, lora=None, **kwargs):
    model = Transformer(TINY, lora=lora)
    config = SFTConfig(num_steps=6, learning_rate=1e-2, warmup_steps=2, log_every=1)
    params = model.init(jax.random.key(0))
    return sft_train(model, params, iterate_batches(tiny_rows(), batch_size=8, seed=1), config, progress=False,
                     **kwargs)


@needs_devices(8)
@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_sharded_sft_equals_single_device(lora):
    single, _ = train(6, lora)
    sharded, _ = train(6, lora, mesh=make_mesh(parse_mesh("data=2,fsdp=2,tensor=2")))
    assert sharded["layers"]["wq"].sharding.spec != ()  # really sharded
    if lora is not None:  # the adapter trained and is sharded too
        assert sharded["layers"]["lora"]["wq"]["b"].sharding.spec != ()
        assert np.abs(np.asarray(single["layers"]["lora"]["wq"]["b"])).max() > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6), single, sharded)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_resumed_sft_equals_uninterrupted(tmp_path, lora):
    uninterrupted, _ = train(6, lora)
    calls = []

    def preempt_after_3():  # asked once after each step
        calls.append(1)
        return len(calls) == 3

    with Checkpointer(tmp_path, save_every=100) as checkpointer:
        _, steps = train(6, lora, checkpointer=checkpointer, should_stop=preempt_after_3)
        assert steps == 3 and checkpointer.latest_step() == 3  # saved on preemption
    with Checkpointer(tmp_path, save_every=100) as checkpointer:
        resumed, steps = train(6, lora, checkpointer=checkpointer)
        assert steps == 6 and checkpointer.latest_step() == 6
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), uninterrupted, resumed)


def test_non_finite_steps_change_nothing_then_stop_the_run():
    model = Transformer(TINY)
    params = model.init(jax.random.key(0))
    params["final_norm"] = params["final_norm"].at[0].set(np.nan)
    reports = []
    with pytest.raises(FloatingPointError, match="5 SFT steps in a row had a non-finite loss"):
        sft_train(model, params, iterate_batches(tiny_rows(), batch_size=8),
                  SFTConfig(num_steps=20, warmup_steps=0, log_every=1), progress=False,
                  metrics_callback=lambda step, m: reports.append(m))
    assert [m["skipped"] for m in reports] == [1] * 5


# ---------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, teacher_tokenizer):
    root = tmp_path_factory.mktemp("sft")
    student = Transformer(ModelConfig(vocab_size=len(teacher_tokenizer), hidden_size=16, intermediate_size=32,
                                      num_layers=1, num_heads=2, num_kv_heads=1, tie_embeddings=True,
                                      max_position_embeddings=128, eos_token_ids=(teacher_tokenizer.eos_token_id,)))
    save_pretrained(student, student.init(jax.random.key(0)), root / "student", tokenizer=teacher_tokenizer)
    traces = write_traces(str(root / "traces.jsonl"), RECORDS)
    config = SFTRunConfig(model=str(root / "student"), data=traces, output_dir=str(root / "run"), seq_len=64,
                          batch_size=8, num_steps=4, save_every=2, log_every=1, mesh="data=-1", remat=True)
    return config, run_sft(config)


def test_sft_stage_writes_a_complete_run_directory(sft_run):
    config, summary = sft_run
    out = config.output_dir
    assert summary["steps"] == 4 and summary["traces"] == len(RECORDS)
    assert all(os.path.exists(os.path.join(out, name)) for name in
               ("config.json", "summary.json", "training_curves.png", "tensorboard", "final/model.safetensors"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) and m["skipped"] == 0 for m in metrics)
    assert os.listdir(os.path.join(out, "checkpoints")) and sorted(
        int(d) for d in os.listdir(os.path.join(out, "checkpoints")) if d.isdigit()) == [2, 4]


def test_exported_policy_reloads_with_identical_logits(sft_run):
    config, _ = sft_run
    model, exported = load_pretrained(resolve_init(config.output_dir))
    optimizer = make_optimizer(SFTConfig(num_steps=4, warmup_steps=0).optimizer_config())
    with Checkpointer(os.path.join(config.output_dir, "checkpoints")) as checkpointer:
        trained, _ = checkpointer.restore(4, {"params": exported, "opt_state": optimizer.init(exported)})
    ids = np.asarray(load_tokenizer(resolve_init(config.output_dir))(RECORDS[0]["prompt"])["input_ids"])[None]
    np.testing.assert_array_equal(np.asarray(model.apply(exported, ids)), np.asarray(model.apply(trained["params"], ids)))


def test_a_changed_config_in_the_same_output_dir_is_refused(sft_run):
    config, _ = sft_run
    with pytest.raises(ValueError, match="holds a run with a different config"):
        run_sft(dataclasses.replace(config, learning_rate=0.5))


def test_resolve_init(tmp_path, sft_run):
    config, _ = sft_run
    assert resolve_init(config.output_dir) == os.path.join(config.output_dir, "final")
    assert resolve_init(TEACHER_DIR) == TEACHER_DIR
    with pytest.raises(FileNotFoundError, match="no model or run at"):
        resolve_init(tmp_path / "missing")
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no final/ export: it has not finished"):
        resolve_init(tmp_path / "unfinished")


def test_export_is_readable_by_all_and_carries_no_loading_flags(sft_run):
    final = os.path.join(sft_run[0].output_dir, "final")
    mode = lambda name: stat.S_IMODE(os.stat(os.path.join(final, name)).st_mode)  # noqa: E731
    assert mode("model.safetensors") == mode("config.json")  # the umask's, as every other file (not 0600)
    with open(os.path.join(final, "tokenizer_config.json")) as f:
        assert "local_files_only" not in json.load(f)


def test_non_finite_weights_are_never_exported(tmp_path):
    model = Transformer(TINY)
    params = model.init(jax.random.key(0))
    params["embed"] = params["embed"].at[3, 1].set(np.inf)
    with pytest.raises(FloatingPointError, match="not finite"):
        export_policy(model, params, None, str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()


def test_a_sft_run_resumes_from_a_chosen_earlier_step_with_another_learning_rate(sft_run, tmp_path):
    config, _ = sft_run
    run_dir = tmp_path / "moved"
    shutil.copytree(config.output_dir, run_dir)  # a moved run is the same run
    branch = dataclasses.replace(config, output_dir=str(run_dir) + "/", resume_step=2, learning_rate=1e-4)
    assert run_sft(branch)["steps"] == 4
    assert sorted(int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit()) == [2, 4]
    with open(run_dir / "metrics.jsonl") as f:
        resumed = [json.loads(line) for line in f][4:]  # after the 4 steps of the original run
    assert [m["step"] for m in resumed] == [3, 4]
    assert resumed[0]["learning_rate"] < 1e-4  # the new, lower rate (on its cosine) after step 2


def test_malformed_trace_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "traces.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(ValueError, match=rf"{path}, line 2: not a JSON object"):
        read_traces(str(path))


# ---------------------------------------------------------------------------------------------- run directories


RUN = {"model": "models/base", "data": "traces.jsonl", "output_dir": "runs/a", "learning_rate": 1e-3}


def test_the_same_run_spelled_or_placed_differently_is_resumed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepare_output_dir("runs/a", RUN, overwrite=False)
    for spelling in ("runs/a/", "./runs/a", str(tmp_path / "runs" / "a")):
        prepare_output_dir(spelling, {**RUN, "output_dir": spelling, "model": "./models/base/"}, overwrite=False)
    shutil.copytree("runs/a", "elsewhere/b")  # a moved or copied run: same config, other output_dir
    prepare_output_dir("elsewhere/b", {**RUN, "output_dir": "elsewhere/b"}, overwrite=False)
    with pytest.raises(ValueError, match=r"different config \(learning_rate differ\)"):
        prepare_output_dir("runs/a", {**RUN, "learning_rate": 0.5}, overwrite=False)


def test_overwrite_deletes_only_a_run_of_ours_that_holds_no_model_being_read(tmp_path, teacher_tokenizer):
    model_dir = tmp_path / "model"
    save_pretrained(Transformer(TINY), Transformer(TINY).init(jax.random.key(0)), model_dir)
    (model_dir / "NOTES.txt").write_text("keep me")
    config = {**RUN, "model": str(model_dir)}
    for overwrite in (False, True):  # a model directory, not a run: never deleted
        with pytest.raises(ValueError, match="no grpo_jax run wrote"):
            prepare_output_dir(str(model_dir), config, overwrite=overwrite, reads=(str(model_dir),))
    assert sorted(os.listdir(model_dir)) == ["NOTES.txt", "config.json", "generation_config.json", "model.safetensors"]

    run_dir = tmp_path / "run"
    prepare_output_dir(str(run_dir), RUN, overwrite=False)
    shutil.copytree(model_dir, run_dir / "final")
    with pytest.raises(ValueError, match="--overwrite would delete .*the model this run starts from"):
        prepare_output_dir(str(run_dir), {**RUN, "seed": 1}, overwrite=True, reads=(str(run_dir / "final"),))
    assert (run_dir / "final" / "model.safetensors").exists()
    prepare_output_dir(str(run_dir), {**RUN, "seed": 1}, overwrite=True, reads=(str(model_dir),))
    assert os.listdir(run_dir) == ["config.json"]  # another run of ours: deleted, then started afresh


def test_a_run_that_recorded_a_field_at_its_old_path_still_matches():
    """Runs used to record the sampling temperature twice (top level and grpo.temperature): such a run still
    resumes, and a changed value at the new path is still a difference."""
    now = {"model": "/m", "grpo": {"temperature": 1.0, "beta": 0.04}}
    older = {"model": "/m", "temperature": 1.0, "grpo": {"temperature": 1.0, "beta": 0.04}}
    assert config_differences(older, now) == []
    assert config_differences(older, {**now, "grpo": {"temperature": 0.7, "beta": 0.04}}) == ["grpo.temperature"]
    assert config_differences({"model": "/m", "temperature": 1.0}, {"model": "/m"}) == ["temperature"]
