"""Grade-school word problems with integer answers, generated from templates as GSM8K-format JSONL.

Each template draws its numbers from a seeded generator and writes the question, a worked solution in
GSM8K's style (one line per step, with calculator annotations such as ``<<4*12=48>>``) and the answer after
"####". Training and evaluation use disjoint templates: evaluation problems come only from `EVAL_TEMPLATES`,
so they measure transfer to unseen wordings and structures rather than recall of the training ones.

    write_word_problems("data/word_problems", seed=0)     # train.jsonl and test.jsonl
    python -m grpo_jax.data.word_problems data/word_problems
    python experiments/r1.py --preset smollm2 --task gsm8k --data data/word_problems
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
from collections.abc import Callable, Sequence

NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Lena", "Mia", "Noah", "Omar")
ITEMS = ("apple", "pencil", "sticker", "marble", "book", "cookie", "card", "shell", "toy car", "balloon")

Solution = tuple[str, list[str], int]  # (question, solution lines, answer)


@dataclasses.dataclass(frozen=True)
class WordProblemTemplate:
    """A kind of word problem: `make(rng)` draws one as (question, solution lines, integer answer)."""

    name: str
    make: Callable[[random.Random], Solution]


def step(a: int, op: str, b: int) -> tuple[str, int]:
    """GSM8K's worked arithmetic, e.g. ``4*12 = <<4*12=48>>48``, and its value."""
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return f"{a}{op}{b} = <<{a}{op}{b}={value}>>{value}", value


def _people(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(NAMES, 2)
    return first, second


def buy(rng: random.Random) -> Solution:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count, price = rng.randint(2, 9), rng.randint(2, 12)
    cost, total = step(count, "*", price)
    return (f"{name} buys {count} {item}s that cost ${price} each. How many dollars does {name} spend?",
            [f"{name} spends {cost} dollars."], total)


def change(rng: random.Random) -> Solution:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count, price = rng.randint(2, 6), rng.randint(2, 9)
    money = count * price + rng.randint(1, 40)
    cost, spent = step(count, "*", price)
    left, answer = step(money, "-", spent)
    return (f"{name} has ${money} and buys {count} {item}s at ${price} each. How many dollars does {name} have left?",
            [f"The {item}s cost {cost} dollars.", f"{name} has {left} dollars left."], answer)


def give_and_buy(rng: random.Random) -> Solution:
    (name, friend), item = _people(rng), rng.choice(ITEMS)
    have = rng.randint(10, 60)
    give, more = rng.randint(1, have - 1), rng.randint(2, 30)
    after, kept = step(have, "-", give)
    now, answer = step(kept, "+", more)
    return (f"{name} has {have} {item}s and gives {give} to {friend}. Then {name} buys {more} more. "
            f"How many {item}s does {name} have now?",
            [f"After giving some away, {name} has {after} {item}s.", f"Now {name} has {now} {item}s."], answer)


def boxes(rng: random.Random) -> Solution:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count, each = rng.randint(2, 9), rng.randint(3, 12)
    taken = rng.randint(1, count * each - 1)
    total, full = step(count, "*", each)
    left, answer = step(full, "-", taken)
    return (f"There are {count} boxes with {each} {item}s in each box. {name} takes out {taken} {item}s. "
            f"How many {item}s are left in the boxes?",
            [f"The boxes hold {total} {item}s.", f"{left} {item}s are left."], answer)


def share(rng: random.Random) -> Solution:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    shared, answer = step(friends * each, "/", friends)
    return (f"{name} shares {friends * each} {item}s equally among {friends} friends. "
            f"How many {item}s does each friend get?", [f"Each friend gets {shared} {item}s."], answer)


def pages(rng: random.Random) -> Solution:
    name = rng.choice(NAMES)
    per_day, days = rng.randint(3, 25), rng.randint(2, 9)
    read, answer = step(per_day, "*", days)
    return (f"{name} reads {per_day} pages every day. How many pages does {name} read in {days} days?",
            [f"{name} reads {read} pages."], answer)


def more_than(rng: random.Random) -> Solution:
    (name, friend), item = _people(rng), rng.choice(ITEMS)
    have, extra = rng.randint(5, 50), rng.randint(2, 30)
    theirs, friend_has = step(have, "+", extra)
    together, answer = step(have, "+", friend_has)
    return (f"{name} has {have} {item}s. {friend} has {extra} more {item}s than {name}. "
            f"How many {item}s do they have together?",
            [f"{friend} has {theirs} {item}s.", f"Together they have {together} {item}s."], answer)


# Held out: structures and wordings that no training problem uses.
def orchard(rng: random.Random) -> Solution:
    rows, per_row = rng.randint(2, 9), rng.randint(3, 12)
    died = rng.randint(1, rows * per_row - 1)
    planted, total = step(rows, "*", per_row)
    alive, answer = step(total, "-", died)
    return (f"A farmer plants {rows} rows of trees with {per_row} trees in each row. {died} of the trees die. "
            "How many trees are still alive?", [f"The farmer plants {planted} trees.", f"{alive} trees are alive."],
            answer)


def wages(rng: random.Random) -> Solution:
    name = rng.choice(NAMES)
    wage, hours = rng.randint(5, 15), rng.randint(2, 8)
    spent = rng.randint(1, wage * hours - 1)
    earned, total = step(wage, "*", hours)
    left, answer = step(total, "-", spent)
    return (f"{name} earns ${wage} an hour and works for {hours} hours, then spends ${spent} on lunch. "
            f"How many dollars does {name} have now?",
            [f"{name} earns {earned} dollars.", f"{name} has {left} dollars now."], answer)


def classroom(rng: random.Random) -> Solution:
    girls, boys, each = rng.randint(5, 20), rng.randint(5, 20), rng.randint(2, 5)
    students, count = step(girls, "+", boys)
    pencils, answer = step(count, "*", each)
    return (f"A class has {girls} girls and {boys} boys. The teacher gives every student {each} pencils. "
            "How many pencils does the teacher give out?",
            [f"There are {students} students.", f"The teacher gives out {pencils} pencils."], answer)


def lost_and_found(rng: random.Random) -> Solution:
    (name, friend), item = _people(rng), rng.choice(ITEMS)
    have = rng.randint(10, 60)
    lost = rng.randint(1, min(have - 1, 20))
    after, kept = step(have, "-", lost)
    gift, given = step(lost, "*", 2)
    now, answer = step(kept, "+", given)
    return (f"{name} had {have} {item}s and lost {lost} of them. Then {friend} gave {name} twice as many "
            f"{item}s as {name} lost. How many {item}s does {name} have now?",
            [f"After losing some, {name} has {after} {item}s.", f"{friend} gives {gift} {item}s.",
             f"Now {name} has {now} {item}s."], answer)


TRAIN_TEMPLATES = tuple(WordProblemTemplate(fn.__name__, fn) for fn in (buy, change, give_and_buy, boxes, share,
                                                                         pages, more_than))
EVAL_TEMPLATES = tuple(WordProblemTemplate(fn.__name__, fn) for fn in (orchard, wages, classroom, lost_and_found))


def word_problems(templates: Sequence[WordProblemTemplate], count: int, rng: random.Random) -> list[dict]:
    """`count` distinct problems as GSM8K records (question, answer "lines\\n#### N"), templates in turn;
    each record also names its template."""
    records, seen = [], set()
    for attempt in range(50 * count + 100):
        if len(records) == count:
            break
        template = templates[attempt % len(templates)]
        question, lines, answer = template.make(rng)
        if question not in seen:
            seen.add(question)
            records.append({"question": question, "answer": "\n".join(lines) + f"\n#### {answer}",
                            "template": template.name})
    if len(records) < count:
        raise ValueError(f"only {len(records)} distinct word problems found: ask for fewer than {count}")
    return records


def write_word_problems(out_dir: str, seed: int = 0, num_train: int = 2000, num_eval: int = 200) -> str:
    """train.jsonl (training templates) and test.jsonl (held-out templates) in `out_dir`, the layout the
    gsm8k task reads; returns `out_dir`."""
    rng = random.Random(f"word-problems:{seed}")
    splits = {"train.jsonl": word_problems(TRAIN_TEMPLATES, num_train, rng),
              "test.jsonl": word_problems(EVAL_TEMPLATES, num_eval, rng)}
    os.makedirs(out_dir, exist_ok=True)
    for name, records in splits.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="where train.jsonl and test.jsonl go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_train", type=int, default=2000)
    p.add_argument("--num_eval", type=int, default=200)
    args = p.parse_args(argv)
    print(write_word_problems(args.out_dir, args.seed, args.num_train, args.num_eval))


if __name__ == "__main__":
    main()
