"""Run TRL's GRPOTrainer benchmark script (`trl_bench.py`, from the peer benchmark set) with its constants taken
from the environment.

The peer script hard-codes 64 new tokens, 2 threads and its repetition counts. This runs the script's own
source with exactly these substitutions and nothing else, so the long-completion and one-thread workloads of
docs/benchmarks.md can be measured with the same code:

  PEER_MAX_NEW      new tokens per completion (the script's MAX_NEW, 64)
  PEER_THREADS      torch.set_num_threads (2)
  PEER_REPS         timed generate / forward+backward repetitions (7)
  PEER_TRAIN_RUNS   fresh GRPOTrainer runs (2)

and one fix: with datasets 5 the script's last summary line passes a `Column` where the tokenizer wants a list
and crashes after every timing, before it writes PEER_OUT.

Run it with the peer's own venv (the script's header says how to make one), not this project's:
  PEER_MAX_NEW=512 PEER_MODEL_DIR=$PWD/peer-tiny-qwen2 PEER_OUT=$PWD/trl_512.json \
    PEER_VENV/bin/python experiments/trl_peer.py PEERS/trl_bench.py
"""

import os
import re
import sys


def _substitutions(env):
    """(pattern, replacement) pairs; a pattern whose variable is unset is replaced by itself."""
    def constant(name, template):
        raw = env.get(name)
        return template.format(int(raw)) if raw else r"\g<0>"  # int() refuses anything but an integer

    return [
        (r"^(N_PROMPTS, NUM_GEN, MAX_NEW = \d+, \d+, )\d+$", constant("PEER_MAX_NEW", r"\g<1>{}")),
        (r"^torch\.set_num_threads\(\d+\)$", constant("PEER_THREADS", "torch.set_num_threads({})")),
        (r"^REPS = \d+", constant("PEER_REPS", "REPS = {}")),
        (r"^TRAIN_RUNS = \d+", constant("PEER_TRAIN_RUNS", "TRAIN_RUNS = {}")),
        (r'hf_tok\(train_ds\["prompt"\]\)', 'hf_tok(list(train_ds["prompt"]))'),
    ]


def patch_source(source, env):
    """The peer script's source with the environment's constants; each pattern must occur exactly once."""
    for pattern, replacement in _substitutions(env):
        source, matches = re.subn(pattern, replacement, source, flags=re.M)
        if matches != 1:
            raise ValueError(f"peer script: expected one match of {pattern!r}, found {matches}; "
                             "the peer script changed: update experiments/trl_peer.py")
    return source


def main(argv):
    if len(argv) != 2:
        sys.exit("usage: python experiments/trl_peer.py PATH/TO/trl_bench.py")
    path = os.path.abspath(argv[1])
    with open(path) as f:
        source = patch_source(f.read(), os.environ)
    code = compile(source, path, "exec")
    exec(code, {"__name__": "__main__", "__file__": path})


if __name__ == "__main__":
    main(sys.argv)
