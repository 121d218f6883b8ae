"""A deterministic generator of grade-school word problems in gsm8k's format.

Each problem is ``{"question": str, "answer": str}``; the answer works one line per step in
gsm8k's calculator notation (``3 + 4 = <<3+4=7>>7``) and ends ``#### N``. A problem starts from
a quantity and applies one to three operations (add, subtract, multiply, divide exactly), each
told by one of several templates; numbers stay small enough that a model of a few million
parameters trained for minutes on a CPU can do the arithmetic digit by digit.

``python -m scenarios.gsm.problems`` writes ``data/train.jsonl.gz`` and ``data/test.jsonl``; the
same seed gives the same files, and no test question appears in the train split.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from scenarios.gsm import DATA

NAMES = ("Ava", "Ben", "Carla", "Dev", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kira", "Leo",
         "Maya", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yara", "Zoe")
SHE = {"Ava", "Carla", "Emma", "Grace", "Iris", "Kira", "Maya", "Olga", "Rosa", "Tara", "Vera", "Yara", "Zoe"}
ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "shells", "stamps", "cards",
         "eggs", "flowers", "coins", "toy cars", "beads", "balloons", "candies", "pens", "rocks")
CONTAINERS = ("boxes", "bags", "packs", "jars", "baskets", "crates")
PLACES = ("the store", "the market", "the fair", "school", "the park")

# Bounds on every number in a problem: operands of + and - up to 2 digits, factors of * and /
# one digit, every intermediate result at most MAX_VALUE. A first model trained on results up to
# 300 (additions up to 40) got 18% of its steps wrong, nearly all carries; these bounds keep the
# arithmetic within what the ~1M-parameter model learns in its 15 minutes.
MAX_START = 40
MAX_ADD = 30
MAX_FACTOR = 9
MAX_VALUE = 200
TRAIN_SIZE = 60_000
TEST_SIZE = 600


@dataclass(frozen=True)
class Step:
    op: str       # "+", "-", "*", "/"
    operand: int
    result: int


def _pronoun(name: str) -> str:
    return "she" if name in SHE else "he"


def _first(name: str, value: int, item: str, rng: random.Random) -> str:
    return rng.choice((
        f"{name} has {value} {item}.",
        f"{name} starts with {value} {item}.",
        f"There are {value} {item} in {name}'s room.",
        f"{name} collected {value} {item}.",
    ))


def _add(name: str, n: int, item: str, rng: random.Random) -> str:
    p = _pronoun(name).capitalize()
    return rng.choice((
        f"{p} buys {n} more {item} at {rng.choice(PLACES)}.",
        f"A friend gives {name} {n} more {item}.",
        f"Then {name} finds {n} more {item}.",
        f"{p} gets {n} more {item} for a birthday.",
    ))


def _sub(name: str, n: int, item: str, rng: random.Random) -> str:
    p = _pronoun(name).capitalize()
    return rng.choice((
        f"{p} gives {n} {item} to a friend.",
        f"{name} loses {n} of the {item}.",
        f"Then {name} sells {n} {item} at {rng.choice(PLACES)}.",
        f"{p} uses {n} of the {item}.",
    ))


def _mul(name: str, n: int, item: str, rng: random.Random) -> str:
    return rng.choice((
        f"Then {name} ends up with {n} times as many {item}.",
        f"A month later {name} has {n} times that many {item}.",
        f"Each of those {item} is traded for {n} new ones.",
        f"{name} fills {rng.choice(CONTAINERS)} so that there are {n} times as many {item}.",
    ))


def _div(name: str, n: int, item: str, rng: random.Random) -> str:
    return rng.choice((
        f"{name} splits the {item} equally into {n} groups and keeps one group.",
        f"{name} shares them equally among {n} friends, keeping only one share.",
        f"Then {name} keeps one of every {n} {item}.",
    ))


PHRASES: dict[str, Callable[[str, int, str, random.Random], str]] = {"+": _add, "-": _sub, "*": _mul, "/": _div}


def _draw_step(value: int, rng: random.Random) -> Step | None:
    op = rng.choice("+-*/")
    if op == "+":
        n = rng.randint(2, MAX_ADD)
        return Step(op, n, value + n) if value + n <= MAX_VALUE else None
    if op == "-":
        if value < 2:
            return None
        n = rng.randint(1, min(value - 1, MAX_ADD * 2))
        return Step(op, n, value - n) if n >= 1 and value - n >= 1 else None
    if op == "*":
        n = rng.randint(2, MAX_FACTOR)
        return Step(op, n, value * n) if value * n <= MAX_VALUE else None
    divisors = [d for d in range(2, MAX_FACTOR + 1) if value % d == 0]
    if not divisors:
        return None
    n = rng.choice(divisors)
    return Step(op, n, value // n)


def _answer_line(name: str, before: int, step: Step, item: str) -> str:
    expr = f"{before}{step.op}{step.operand}"
    return f"{name} has {before} {step.op} {step.operand} = <<{expr}={step.result}>>{step.result} {item}."


def problem(rng: random.Random) -> dict[str, str]:
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    start = rng.randint(2, MAX_START)
    n_steps = rng.choice((1, 2, 3))
    steps: list[Step] = []
    value = start
    while len(steps) < n_steps:
        step = _draw_step(value, rng)
        if step is not None:
            steps.append(step)
            value = step.result
    sentences = [_first(name, start, item, rng)] + [PHRASES[s.op](name, s.operand, item, rng) for s in steps]
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    lines, before = [], start
    for s in steps:
        lines.append(_answer_line(name, before, s, item))
        before = s.result
    answer = "\n".join(lines) + f"\n#### {value}"
    return {"question": question, "answer": answer}


def generate(n: int, seed: int, exclude: set[str] | None = None) -> list[dict[str, str]]:
    """``n`` distinct problems from ``seed``, none whose question is in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[dict[str, str]] = []
    while len(out) < n:
        p = problem(rng)
        if p["question"] in seen:
            continue
        seen.add(p["question"])
        out.append(p)
    return out


def _open(path: Path, mode: str) -> IO[str]:
    if path.suffix == ".gz":  # mtime 0: the same rows give the same bytes
        return io.TextIOWrapper(gzip.GzipFile(path, mode[0] + "b", mtime=0), encoding="utf-8")
    return path.open(mode, encoding="utf-8")


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict[str, str]]:
    with _open(path, "r") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=TRAIN_SIZE)
    ap.add_argument("--test", type=int, default=TEST_SIZE)
    ap.add_argument("--out", type=Path, default=DATA)
    args = ap.parse_args(argv)
    test = generate(args.test, seed=args.seed + 1)
    train = generate(args.train, seed=args.seed, exclude={p["question"] for p in test})
    write_jsonl(train, args.out / "train.jsonl.gz")
    write_jsonl(test, args.out / "test.jsonl")
    print(f"wrote {len(train)} train and {len(test)} test problems to {args.out}")


if __name__ == "__main__":
    main()
