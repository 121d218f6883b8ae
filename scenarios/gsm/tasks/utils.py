"""Dataset loader of the offline tasks: the shipped JSONL splits, found next to this file."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "data"


def load_splits(**_: Any) -> Any:
    """``{"train", "test"}`` of the shipped problems as a ``datasets.DatasetDict`` (json builder)."""
    import datasets

    files = {"train": str(DATA / "train.jsonl.gz"), "test": str(DATA / "test.jsonl")}
    return datasets.load_dataset("json", data_files=files)


# Wrong final results offered beside the right one: near misses (off by one, two, ten) that a
# model which did not compute the last step could well prefer.
DELTAS = (1, -1, 2, -2, 10, -10)
CHOICES = 4
_FINAL = re.compile(r"=(\d+)>>(\d+)(?!.*<<)(.*)\n#### (\d+)$", re.S)


def with_result(answer: str, result: int) -> str:
    """``answer`` (worked steps ending ``#### N``) with its last step's result and final line
    replaced by ``result``."""
    m = _FINAL.search(answer)
    if m is None:
        raise ValueError(f"not a worked answer ending '#### N': {answer!r}")
    return answer[:m.start()] + f"={result}>>{result}{m.group(3)}\n#### {result}"


def add_choices(dataset: Any) -> Any:
    """Each problem as a multiple-choice document: its worked answer and ``CHOICES - 1`` copies
    whose final result is wrong, in an order drawn from the question (the same every run)."""

    def one(doc: dict[str, Any]) -> dict[str, Any]:
        gold = int(doc["answer"].rsplit("#### ", 1)[1])
        rng = random.Random(hashlib.sha256(doc["question"].encode()).hexdigest())
        wrong = [gold + d for d in rng.sample(DELTAS, len(DELTAS)) if gold + d >= 0][: CHOICES - 1]
        options = [gold, *wrong]
        rng.shuffle(options)
        return {"choices": [with_result(doc["answer"], v) for v in options], "label": options.index(gold)}

    return dataset.map(one)
