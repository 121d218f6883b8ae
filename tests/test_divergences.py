"""``harness.divergences``: every diverging request of a failed case, with both token streams and,
when the checkpoint ships a tokenizer, each token's text."""

from __future__ import annotations

import json
from pathlib import Path

from harness.compare import compare
from harness.divergences import divergence_records, token_decoder
from reference_impl.requests import RequestOutput


def out(rid: str, tokens: list[int]) -> RequestOutput:
    """Each step's token is top-1 at -0.1, the next id second at -1.1."""
    return RequestOutput(rid, 4, list(tokens), [-0.1] * len(tokens), [[(t, -0.1), (t + 1, -1.1)] for t in tokens])


def failing_pair() -> tuple[list[RequestOutput], list[RequestOutput]]:
    """Requests a and c diverge (at steps 2 and 0), b does not."""
    base = [out("a", [1, 2, 3, 4]), out("b", [5, 6, 7, 8]), out("c", [9, 10, 11, 12])]
    cand = [out("a", [1, 2, 13, 14]), out("b", [5, 6, 7, 8]), out("c", [15, 10, 11, 12])]
    return cand, base


def word_tokenizer(directory: Path, words: list[str]) -> Path:
    """A checkpoint directory holding only a ``tokenizer.json`` (a word-level vocabulary)."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])).save(
        str(directory / "tokenizer.json"))
    return directory


def test_one_record_per_diverging_request_earliest_first() -> None:
    cand, base = failing_pair()
    verdict = compare(cand, base)
    records = divergence_records(verdict, cand, base)
    assert [(r["request_id"], r["step"]) for r in records] == [("c", 0), ("a", 2)]
    assert records[0]["request_id"] == verdict.first_divergence.request_id  # type: ignore[union-attr]
    a = records[1]
    assert a["baseline_tokens"] == [1, 2, 3, 4] and a["candidate_tokens"] == [1, 2, 13, 14]
    assert a["candidate_stream"] == "free" and a["failing_in_request"] == 1
    assert "token_text" not in a  # no checkpoint, no tokenizer: the report shows ids
    assert json.loads(json.dumps(records)) == records


def test_token_text_from_the_checkpoints_tokenizer(tmp_path: Path) -> None:
    words = ["<unk>", "the", " cat", " sat", " on", " mat", "x6", "x7", "x8", "x9", "x10", "x11", "x12",
             " dog", " ran", " far", "x16"]
    ckpt = word_tokenizer(tmp_path, words)
    decode = token_decoder(ckpt)
    assert decode is not None and decode(2) == " cat"
    assert token_decoder(tmp_path / "missing") is None
    cand, base = failing_pair()
    records = divergence_records(compare(cand, base), cand, base, checkpoint=ckpt)
    texts = records[1]["token_text"]
    assert texts["3"] == " sat" and texts["13"] == " dog" and texts["14"] == " ran"
    assert set(texts) >= {str(t) for t in [1, 2, 3, 4, 13, 14]}
