"""Requests files (``parity run --requests FILE``, ``scenarios.request_file``): the writer and the
reader give back the same requests bit for bit, and every kind of invalid file is refused with
one line per problem, naming the request and what the model needs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from harness.baseline import requests_hash
from harness.matrix import get_matrix
from harness.plan import RunOptions, scenario_names
from reference_impl.config import ModelConfig, load_config
from reference_impl.requests import Request
from scenarios.models import checkpoint
from scenarios.registry import FileScenario, get_scenario
from scenarios.request_file import FORMAT, RequestFileError, load_requests, save_requests, scenario_name

from helpers import requests as scenario_requests


@pytest.fixture(scope="module")
def llava() -> ModelConfig:
    return load_config(checkpoint("tiny-llava"))


@pytest.fixture(scope="module")
def llama() -> ModelConfig:
    return load_config(checkpoint("tiny-llama"))


def _same(got: list[Request], want: list[Request]) -> None:
    assert [r.request_id for r in got] == [r.request_id for r in want]
    for g, w in zip(got, want, strict=True):
        assert (g.prompt_ids, g.max_new_tokens, g.top_k) == (w.prompt_ids, w.max_new_tokens, w.top_k)
        if w.prompt_embeds is None:
            assert g.prompt_embeds is None
        else:
            assert g.prompt_embeds is not None and g.prompt_embeds.dtype == w.prompt_embeds.dtype
            assert torch.equal(g.prompt_embeds, w.prompt_embeds)
        assert len(g.images) == len(w.images)
        for a, b in zip(g.images, w.images, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


# --- the writer and the reader ------------------------------------------------------------------


def test_round_trip_of_text_embeds_and_images_is_bit_exact(tmp_path: Path, llava: ModelConfig) -> None:
    want = [*scenario_requests("tiny-llava", "mixed"), *scenario_requests("tiny-llava", "multimodal")]
    want = [Request(r.request_id, r.prompt_ids, r.prompt_embeds, r.images, max_new_tokens=3 + i, top_k=2 + i % 4)
            for i, r in enumerate(want)]
    assert {r.kind for r in want} == {"text", "prompt_embeds", "multimodal"}
    path = save_requests(tmp_path / "repro" / "bug42.json", want)
    assert sorted(p.name for p in path.parent.iterdir()) == ["bug42.json", "bug42.safetensors"]
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT and len(doc["requests"]) == len(want)
    got = load_requests(path, llava, torch.float32)
    _same(got, want)
    # The same requests, so the same baseline cache key.
    assert requests_hash(got) == requests_hash(want)


def test_round_trip_keeps_bfloat16_embeds(tmp_path: Path, llava: ModelConfig) -> None:
    embeds = torch.randn(5, llava.text.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    want = [Request("e", prompt_embeds=embeds, max_new_tokens=2), Request("t", (1, 2, 3), max_new_tokens=2)]
    got = load_requests(save_requests(tmp_path / "bf.json", want), llava, torch.bfloat16)
    _same(got, want)


def test_embeds_are_cast_to_the_run_dtype(tmp_path: Path, llama: ModelConfig) -> None:
    embeds = torch.randn(4, llama.text.hidden_size, dtype=torch.float64)
    path = save_requests(tmp_path / "f64.json", [Request("e", prompt_embeds=embeds)])
    (got,) = load_requests(path, llama, torch.bfloat16)
    assert got.prompt_embeds is not None and got.prompt_embeds.dtype == torch.bfloat16
    assert torch.equal(got.prompt_embeds, embeds.to(torch.bfloat16))


def test_text_only_file_has_no_tensor_file_and_defaults_apply(tmp_path: Path, llama: ModelConfig) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"format": FORMAT, "requests": [{"request_id": "a", "prompt_ids": [5, 6]}]}))
    (got,) = load_requests(path, llama, torch.float32)
    assert (got.prompt_ids, got.max_new_tokens, got.top_k) == ((5, 6), 16, 5)
    save_requests(tmp_path / "out.json", [got])
    assert not (tmp_path / "out.safetensors").exists()


def test_a_file_of_one_tensor_needs_no_name(tmp_path: Path, llava: ModelConfig) -> None:
    mm = llava.multimodal
    assert mm is not None
    save_file({"pixels": torch.rand(3, 32, 32)}, str(tmp_path / "cat.safetensors"))
    save_file({"x": torch.randn(3, 64)}, str(tmp_path / "emb.safetensors"))
    ids = [1, *[mm.image_token_id] * mm.tokens_per_image, 2]
    _write(tmp_path / "r.json", [{"request_id": "img", "prompt_ids": ids, "images": ["cat.safetensors"]},
                                 {"request_id": "emb", "prompt_embeds": "emb.safetensors"}])
    img, emb = load_requests(tmp_path / "r.json", llava, torch.float32)
    assert img.images[0].shape == (3, 32, 32) and emb.prompt_len == 3


def test_the_writer_refuses_what_the_format_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="forced_tokens"):
        save_requests(tmp_path / "x.json", [Request("a", (1,), max_new_tokens=1, forced_tokens=(3,))])
    with pytest.raises(ValueError, match="unique"):
        save_requests(tmp_path / "x.json", [Request("a", (1,)), Request("a", (2,))])
    assert not list(tmp_path.iterdir())


# --- invalid files --------------------------------------------------------------------------------


def _write(path: Path, requests: Any, **doc: Any) -> Path:
    path.write_text(json.dumps({"format": FORMAT, "requests": requests, **doc}))
    return path


def _problems(path: Path, cfg: ModelConfig) -> list[str]:
    with pytest.raises(RequestFileError) as info:
        load_requests(path, cfg, torch.float32)
    lines = str(info.value).splitlines()
    assert lines == [f"--requests {path}: {p}" for p in info.value.problems]
    return info.value.problems


def _tensors(tmp: Path, **tensors: torch.Tensor) -> str:
    save_file(tensors, str(tmp / "t.safetensors"))
    return "t.safetensors"


IMAGE = 500  # tiny-llava's image placeholder id; 16 per image, images 3 x 32 x 32


@pytest.mark.parametrize(("entry", "expected"), [
    ({"prompt_ids": [1]}, "requests[0]: missing field 'request_id'"),
    ({"request_id": "a"}, "request 'a': missing field 'prompt_ids' or 'prompt_embeds'"),
    ({"request_id": "a", "prompt_ids": [1], "prompt_embeds": "t.safetensors#e"}, "give exactly one of"),
    ({"request_id": "a", "prompt_ids": []}, "prompt_ids must be a non-empty list"),
    ({"request_id": "a", "prompt_ids": [1, 2.5]}, "prompt_ids holds 2.5, not an integer token id"),
    ({"request_id": "a", "prompt_ids": [1, 512, -1]},
     "prompt_ids[1] = 512 is outside the model's vocabulary [0, 512) (and 1 more)"),
    ({"request_id": "a", "prompt_ids": [1], "max_new_tokens": 0}, "max_new_tokens 0: must be an integer >= 1"),
    ({"request_id": "a", "prompt_ids": [1], "max_new_tokens": True}, "max_new_tokens true: must be an integer"),
    ({"request_id": "a", "prompt_ids": [1], "top_k": 513}, "top_k 513: must be an integer between 1 and 512"),
    ({"request_id": "a", "prompt_ids": [1] * 250, "max_new_tokens": 7},
     "250 prompt tokens + max_new_tokens 7 exceed the model's context of 256"),
    ({"request_id": "a", "prompt_ids": [1], "max_new_token": 3}, "unknown fields ['max_new_token']"),
    ({"request_id": "a", "prompt_embeds": "t.safetensors#e32"}, "prompt_embeds t.safetensors#e32 has shape [3, 32]; "
                                                                "the model needs [n, 64]"),
    ({"request_id": "a", "prompt_embeds": "t.safetensors#int"}, "prompt_embeds t.safetensors#int has dtype int64; "
                                                                "expected a floating dtype"),
    ({"request_id": "a", "prompt_embeds": "t.safetensors#nan"}, "holds NaN or Inf"),
    ({"request_id": "a", "prompt_embeds": "t.safetensors#nope"}, "t.safetensors holds no tensor 'nope' (it holds: "),
    ({"request_id": "a", "prompt_embeds": "t.safetensors"}, "the file holds 6 tensors; name one as t.safetensors#NAME"),
    ({"request_id": "a", "prompt_embeds": "gone.safetensors#e"}, "prompt_embeds gone.safetensors#e: no such file"),
    ({"request_id": "a", "prompt_embeds": "bad.safetensors#e"}, "not a complete safetensors file"),
    ({"request_id": "a", "prompt_embeds": 7}, "prompt_embeds must name a tensor as"),
    ({"request_id": "a", "prompt_ids": [1, *[IMAGE] * 16], "images": ["t.safetensors#small"]},
     "images[0] t.safetensors#small has shape [3, 16, 16]; the model's vision tower takes [channels, size, size] "
     "= [3, 32, 32]"),
    ({"request_id": "a", "prompt_ids": [1, *[IMAGE] * 16], "images": ["t.safetensors#img", "t.safetensors#img"]},
     "16 image placeholder tokens (id 500) in prompt_ids for 2 images; the model needs 16 per image (32)"),
    ({"request_id": "a", "prompt_ids": [*[IMAGE] * 8, 1, *[IMAGE] * 8], "images": ["t.safetensors#img"]},
     "image placeholder runs of [8, 8] tokens"),
    ({"request_id": "a", "prompt_ids": [1, IMAGE]}, "1 image placeholder tokens (id 500) in prompt_ids but no images"),
    ({"request_id": "a", "prompt_embeds": "t.safetensors#e", "images": ["t.safetensors#img"]},
     "images need prompt_ids with image placeholder tokens"),
])
def test_an_invalid_request_is_one_line_naming_it(tmp_path: Path, llava: ModelConfig, entry: dict[str, Any],
                                                   expected: str) -> None:
    _tensors(tmp_path, e=torch.randn(3, 64), e32=torch.randn(3, 32), int=torch.ones(3, 64, dtype=torch.int64),
             nan=torch.full((3, 64), float("nan")), img=torch.rand(3, 32, 32), small=torch.rand(3, 16, 16))
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header" + bytes(10))
    problems = _problems(_write(tmp_path / "r.json", [entry]), llava)
    print(problems)
    assert len(problems) == 1 and expected in problems[0]


def test_images_for_a_text_model_are_refused(tmp_path: Path, llama: ModelConfig) -> None:
    _tensors(tmp_path, img=torch.rand(3, 32, 32))
    path = _write(tmp_path / "r.json", [{"request_id": "a", "prompt_ids": [1], "images": ["t.safetensors#img"]}])
    assert _problems(path, llama) == ["request 'a': images given, but LlamaForCausalLM takes no images"]


@pytest.mark.parametrize(("text", "expected"), [
    ("{\"format\": ", "not valid JSON: Expecting value (line 1, column 12)"),
    ("[]", "expected a JSON object"),
    (json.dumps({"requests": [{"request_id": "a", "prompt_ids": [1]}]}), '"format" is null; expected "parity-requests/1"'),
    (json.dumps({"format": FORMAT, "requests": []}), '"requests" must be a non-empty list'),
    (json.dumps({"format": FORMAT, "requests": [{"request_id": "a", "prompt_ids": [1]}], "seed": 1}), "unknown keys ['seed']"),
    (json.dumps({"format": FORMAT, "requests": [[1, 2]]}), "requests[0]: expected a request object, found list"),
])
def test_an_invalid_document_is_named(tmp_path: Path, llama: ModelConfig, text: str, expected: str) -> None:
    path = tmp_path / "r.json"
    path.write_text(text)
    problems = _problems(path, llama)
    assert len(problems) == 1 and expected in problems[0]


def test_a_missing_file_is_named(tmp_path: Path, llama: ModelConfig) -> None:
    assert _problems(tmp_path / "nowhere.json", llama) == ["no such file"]


def test_every_problem_is_listed_one_per_line(tmp_path: Path, llama: ModelConfig) -> None:
    path = _write(tmp_path / "r.json", [
        {"request_id": "a", "prompt_ids": [600]},
        {"request_id": "b", "prompt_ids": [1], "max_new_tokens": -1, "top_k": 0},
        {"request_id": "ok", "prompt_ids": [1]},
        {"request_id": "ok", "prompt_ids": [2]},
    ])
    assert _problems(path, llama) == [
        "request 'a': prompt_ids[0] = 600 is outside the model's vocabulary [0, 512)",
        "request 'b': max_new_tokens -1: must be an integer >= 1",
        "request 'b': top_k 0: must be an integer between 1 and 512",
        "request 'ok': request_id used twice; ids must be unique",
    ]


def test_many_problems_are_capped_with_a_count(tmp_path: Path, llama: ModelConfig) -> None:
    path = _write(tmp_path / "r.json", [{"request_id": f"r{i}", "prompt_ids": [9999]} for i in range(25)])
    with pytest.raises(RequestFileError) as info:
        load_requests(path, llama, torch.float32)
    lines = str(info.value).splitlines()
    assert len(lines) == 21 and lines[-1].endswith("… and 5 more problems")


# --- the scenario ---------------------------------------------------------------------------------


def test_the_file_is_the_scenario_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "bug42.json"
    assert scenario_name(path) == "file:bug42"
    assert get_scenario("file:bug42", path) == FileScenario(path)
    with pytest.raises(ValueError, match="give the file with --requests FILE"):
        get_scenario("file:bug42")
    with pytest.raises(ValueError, match="is not the one of --requests"):
        get_scenario("file:other", path)


def test_the_run_takes_the_file_alone_or_beside_scenarios(tmp_path: Path) -> None:
    smoke, path = get_matrix("smoke"), str(tmp_path / "mine.json")
    with_file = RunOptions(requests_file=path)
    assert scenario_names(smoke, RunOptions()) == list(smoke.scenarios)
    assert scenario_names(smoke, with_file) == ["file:mine"]
    assert scenario_names(smoke, with_file, ["text"]) == ["text", "file:mine"]
    assert scenario_names(smoke, with_file, ["file:mine", "text"]) == ["file:mine", "text"]


def test_file_scenario_requests_are_those_of_the_file(tmp_path: Path) -> None:
    want = scenario_requests("tiny-llava", "mixed")
    path = save_requests(tmp_path / "m.json", want)
    got = FileScenario(path).requests(checkpoint("tiny-llava"), "float32", seed=3, max_new_tokens=99)
    _same(got, want)  # seed and the default max_new_tokens do not apply to a file's requests


# --- runs (tiny-llava, tp2 on the mp launcher) ------------------------------------------------------


def _user_file(tmp_path: Path, llava: ModelConfig) -> Path:
    """A user's own inputs: ids with vocabulary-shard boundaries (256 of 512 at tp2), prompt-embeds
    in one file per tensor, an image between text; each with its own max_new_tokens."""
    mm = llava.multimodal
    assert mm is not None
    gen = torch.Generator().manual_seed(7)
    save_file({"embeds": torch.randn(9, llava.text.hidden_size, generator=gen)}, str(tmp_path / "embeds.safetensors"))
    save_file({"cat": torch.rand(3, 32, 32, generator=gen)}, str(tmp_path / "images.safetensors"))
    return _write(tmp_path / "mine.json", [
        {"request_id": "boundary", "prompt_ids": [17, 255, 256, 257, 3, 99], "max_new_tokens": 4, "top_k": 3},
        {"request_id": "embeds", "prompt_embeds": "embeds.safetensors", "max_new_tokens": 5},
        {"request_id": "picture", "prompt_ids": [5, 8, *[mm.image_token_id] * mm.tokens_per_image, 12, 40],
         "images": ["images.safetensors#cat"], "max_new_tokens": 6},
    ])


def test_a_run_of_a_users_file_passes_and_records_it(tmp_path: Path, llava: ModelConfig) -> None:
    from parity.cli import main

    path, out = _user_file(tmp_path, llava), tmp_path / "out"
    assert main(["run", "--backend", "mp", "--model", "tiny-llava", "--setups", "tp2-eager", "--requests", str(path),
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    [case] = summary["cases"]
    assert (case["id"], case["status"], case["scenario"]) == ("tiny-llava/tp2-eager-file:mine", "pass", "file:mine")
    # The file's three requests ran, each for its own number of tokens.
    assert (case["metrics"]["requests"], case["metrics"]["steps_compared"]) == (3, 4 + 5 + 6)
    run = summary["run"]
    assert run["scenarios"] == ["file:mine"] and run["requests"] == str(path.resolve()) and run["requests_hash"]
    repro = ("parity run --matrix smoke --setups tp2-eager --scenarios file:mine --model tiny-llava --baseline auto "
             f"--dtype float32 --device cpu --backend mp --requests {path.resolve()}")
    assert repro in (out / "index.html").read_text()


def test_a_users_file_catches_a_bug_its_ids_reach(tmp_path: Path, llava: ModelConfig) -> None:
    """The vocabulary-shard off-by-one embeds id 256 to zeros at tp2: the file's boundary request
    exposes it."""
    from parity.cli import main

    path, out = _user_file(tmp_path, llava), tmp_path / "out"
    assert main(["run", "--backend", "mp", "--model", "tiny-llava", "--setups", "tp2-eager", "--requests", str(path),
                 "--mutation", "vocab-shard-boundary-off-by-one", "--out", str(out)]) == 1
    [case] = json.loads((out / "summary.json").read_text())["cases"]
    assert case["status"] == "fail"
    assert "boundary" in {d["request_id"] for d in case["divergences"]}
