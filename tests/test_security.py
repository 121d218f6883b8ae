"""Security properties that a look at the source can check: nothing is unpickled from files
(tensors come through safetensors; results, baselines and reports are JSON), and model weights
reach transformers through safetensors only (or, converting the real model, a GGUF file). (The Ray head's loopback binding is checked in
test_faults_ray.py, workers' catalogued operations in test_distributed.py, report escaping in
test_report.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "parity", "reports", "scenarios", "reference_impl")
# Calls that deserialize arbitrary objects (code execution on a crafted file).
UNSAFE = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
          ("dill", "load"), ("dill", "loads"), ("marshal", "load"), ("marshal", "loads"), ("joblib", "load"),
          ("shelve", "open")}


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _calls(path: Path) -> list[tuple[str, str, ast.Call]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            out.append((name, node.func.attr, node))
    return out


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def test_the_packages_are_scanned() -> None:
    assert len(_sources()) > 50


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_is_unpickled_from_files(path: Path) -> None:
    for owner, attr, call in _calls(path):
        where = f"{path.relative_to(REPO)}:{call.lineno}"
        assert (owner, attr) not in UNSAFE, f"{where}: {owner}.{attr} deserializes arbitrary objects"
        if (owner, attr) == ("torch", "load"):
            assert _keyword(call, "weights_only") is True, f"{where}: torch.load without weights_only=True"
        if (owner, attr) == ("np", "load") or (owner, attr) == ("numpy", "load"):
            assert _keyword(call, "allow_pickle") is not True, f"{where}: numpy load with allow_pickle"
        # A GGUF file (``gguf_file=``, the real model's conversion) is read by the gguf package as
        # raw tensors, no pickle; transformers ignores use_safetensors for it.
        gguf = any(kw.arg == "gguf_file" for kw in call.keywords)
        if attr == "from_pretrained" and owner not in ("AutoTokenizer", "AutoConfig") and not gguf:
            assert _keyword(call, "use_safetensors") is True, f"{where}: weights may come from a pickle"


def test_a_vocabulary_holding_markup_shows_as_text_in_the_report(tmp_path: Path) -> None:
    """A tokenizer whose vocabulary holds ``<script>``: the report shows its tokens as text."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from harness.divergences import token_decoder
    from reports import render_index

    from report_data import ENV, divergence, failure, localization

    vocab = {"[UNK]": 0, "<script>": 1, "alert(1)": 2, "</script>": 3, "<img src=x onerror=alert(2)>": 4}
    Tokenizer(WordLevel(vocab, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    decode = token_decoder(tmp_path)
    assert decode is not None and decode(1) == "<script>"
    div = divergence("pe0", 0, 1, 4, 0.2)
    div["token_text"] = {str(t): decode(t % 5) for t in {*div["baseline_tokens"], *div["candidate_tokens"], 7}}
    record = failure("tp2-sp-graph-full", "text", localization(0, "residual", [0, 1], 1, 0, 0.2), [div])
    html = render_index(tmp_path / "out", [record], ENV).read_text(encoding="utf-8")
    assert "<script>" not in html  # the report's own script tag has attributes
    assert "&lt;script&gt;" in html and "&lt;img src=x onerror=alert(2)&gt;" in html
    assert "<img src=x" not in html and "alert(1)</script>" not in html
