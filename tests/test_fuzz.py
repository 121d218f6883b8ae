"""``parity fuzz``: the strategies draw valid examples (no engine), the reproducer round-trips, a
tiny clean run passes, and a mutated run finds a failure whose reproducer fails again."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from harness.fuzz.example import Example, materialize, setup_candidates
from harness.fuzz.repro import load_example, write_repro
from harness.fuzz.run import FuzzOptions
from harness.fuzz.strategies import examples
from harness.setup import ParallelSetup
from parity.cli import main
from reference_impl.parallel import validate_parallel
from reference_impl.requests import validate_request
from scenarios.request_file import load_requests

_QUICK = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def _table(example: Example) -> torch.Tensor:
    return torch.randn(example.model.vocab, example.model.hidden, generator=torch.Generator().manual_seed(0))


@_QUICK
@given(examples())
def test_drawn_examples_are_valid(example: Example) -> None:
    m = example.model
    assert 1 <= m.layers <= 7 and m.heads % m.kv_heads == 0 and 16 <= m.hidden <= 64 and m.vocab <= 300
    assert 1e-6 <= m.eps <= 1e-2
    assert 1 <= len(example.requests) <= 6
    for setup_id in example.setups:
        setup = ParallelSetup.parse(setup_id)
        assert setup.id == setup_id and setup.world_size <= 4
        validate_parallel(m.config(), setup.tp, setup.pp)
    requests = materialize(example, _table(example))
    for r in requests:
        validate_request(r, m.config(), 256, torch.float32)
        assert r.prompt_len >= 1
    budget = example.engine.max_num_batched_tokens
    assert all(r.length <= 2 * budget + 3 for r in example.requests)


@settings(max_examples=4, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(example=examples())
def test_drawn_config_is_what_the_built_checkpoint_says(tmp_path_factory: pytest.TempPathFactory,
                                                        monkeypatch: pytest.MonkeyPatch, example: Example) -> None:
    """``ModelDraw.config`` (used to fit setups before anything is built) is the engine's reading of
    the checkpoint that transformers builds from the drawn spec."""
    from reference_impl.config import load_config
    from scenarios.models import tiny_checkpoint

    monkeypatch.setenv("PARITY_CACHE", str(tmp_path_factory.getbasetemp() / "fuzz-cache"))
    cfg = load_config(tiny_checkpoint(example.model.spec()))
    assert (cfg.text, cfg.multimodal) == (example.model.config().text, example.model.config().multimodal)


@_QUICK
@given(examples(max_ranks=2))
def test_setups_respect_the_rank_limit(example: Example) -> None:
    assert all(ParallelSetup.parse(s).world_size <= 2 for s in example.setups)


def test_candidates_cover_kv_below_tp_and_odd_layers_under_pp() -> None:
    from harness.fuzz.example import EngineDraw, ModelDraw

    model = ModelDraw("qwen2", 3, 4, 1, 8, 32, 64, 96, 1e-6, True, True, "default", 1e4)
    ids = setup_candidates(model, EngineDraw(16, 2, sp_min_tokens=8), 4)
    assert "tp4-sp-graph-full-spmin8" in ids and "tp1-pp3-eager" in ids and "tp2-pp2-eager" in ids
    assert setup_candidates(model, EngineDraw(16, 2), 4, ["tp4-eager", "tp3-eager"]) == ["tp4-eager"]


def test_reproducer_round_trips(tmp_path: Path) -> None:
    from harness.fuzz.example import EngineDraw, ModelDraw, RequestDraw

    model = ModelDraw("llava", 1, 2, 1, 8, 16, 32, 128, 1e-2, True, False, "default", 1e4, image_size=16)
    reqs = (RequestDraw("embeds", 5, 2, 3, 7), RequestDraw("image", 4, 1, 1, 8, images=2, split=1),
            RequestDraw("text", 1, 3, 2, 9))
    example = Example(model, EngineDraw(12, 2), reqs, ("tp2-sp-graph-full",))
    requests = materialize(example, _table(example))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    found = write_repro(tmp_path / "out", example, ckpt, requests, "tp2-sp-graph-full", "why", "sp-middle-residual-slice")
    assert load_example(found.dir / "example.json") == example
    back = load_requests(found.dir / "requests.json", model.config(), torch.float32)
    for got, want in zip(back, requests, strict=True):
        assert got.prompt_ids == want.prompt_ids and len(got.images) == len(want.images)
        assert (got.prompt_embeds is None) == (want.prompt_embeds is None)
        if want.prompt_embeds is not None:
            assert got.prompt_embeds is not None and torch.equal(got.prompt_embeds, want.prompt_embeds)
    command = (found.dir / "command.txt").read_text().strip()
    argv = shlex.split(command)
    assert argv[:2] == ["parity", "run"] and argv[argv.index("--setups") + 1] == "tp2-sp-graph-full"
    assert argv[argv.index("--max-num-batched-tokens") + 1] == "12" and "--mutation" in argv


@pytest.mark.parametrize("argv", [["fuzz"], ["fuzz", "--budget", "0"], ["fuzz", "--examples", "0"],
                                  ["fuzz", "--examples", "1", "--mutation", "nope"],
                                  ["fuzz", "--examples", "1", "--setups", "tp2-fast"],
                                  ["fuzz", "--examples", "1", "--families", "gpt2"],
                                  ["fuzz", "--budget", "5", "--examples", "1"]])
def test_bad_usage_exits_2(argv: list[str], tmp_path: Path) -> None:
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2


@pytest.mark.parametrize("flag", ["--max-num-seqs", "--max-num-batched-tokens"])
def test_run_refuses_a_batching_limit_below_one(flag: str, tmp_path: Path) -> None:
    assert main(["run", "--setups", "tp2-eager", flag, "0", "--out", str(tmp_path / "o")]) == 2


def test_run_options_carry_the_batching_limits() -> None:
    from harness.plan import RunOptions

    limits = RunOptions(max_num_seqs=2, max_num_batched_tokens=6).limits()
    assert (limits.max_num_seqs, limits.max_num_batched_tokens, limits.max_model_len) == (2, 6, 1024)
    assert RunOptions().limits().max_num_batched_tokens == 24


def test_options_need_a_limit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--budget SECONDS or --examples N"):
        FuzzOptions(out=tmp_path)


def test_clean_run_passes(tmp_path: Path) -> None:
    out = tmp_path / "clean"
    code = main(["fuzz", "--examples", "2", "--seed", "1", "--families", "llama", "--max-ranks", "2",
                 "--out", str(out)])
    report = json.loads((out / "fuzz.json").read_text())
    assert code == 0, report
    assert report["stats"]["examples"] == 2 and report["stats"]["compared"] >= 1 and report["failure"] is None


def test_nothing_compared_is_not_green(tmp_path: Path) -> None:
    """Examples that ran only the one-device oracle checked no parallelism: exit 4, not 0."""
    out = tmp_path / "none"
    code = main(["fuzz", "--examples", "1", "--families", "llama", "--setups", "tp1-pp1-eager", "--out", str(out)])
    assert code == 4
    assert json.loads((out / "fuzz.json").read_text())["stats"]["oracle_only"] == 1


def test_mutation_is_found_shrunk_and_replayed(tmp_path: Path) -> None:
    out = tmp_path / "mut"
    code = main(["fuzz", "--examples", "5", "--seed", "0", "--mutation", "sp-middle-residual-slice",
                 "--families", "llama", "--setups", "tp2-sp-graph-full", "--shrink-budget", "5",
                 "--out", str(out)])
    assert code == 1
    report = json.loads((out / "fuzz.json").read_text())
    assert report["failure"]["setup"] == "tp2-sp-graph-full"
    command = (out / "repro" / "command.txt").read_text().strip()
    assert main(shlex.split(command)[1:]) == 1


def test_hf_baseline_keeps_prompt_token_zero() -> None:
    """Found by the fuzzer: transformers' generate() inferred the attention mask as ids != pad id
    (0) and dropped every prompt token 0, so the oracle's baseline was another prompt's."""
    from harness.baseline import hf_generate
    from reference_impl.loader import load_model
    from reference_impl.requests import Request
    from reference_impl.runner import EngineConfig, Runner
    from scenarios.models import checkpoint

    ck = checkpoint("tiny-llama")
    requests = [Request("zero", (0,), max_new_tokens=3, top_k=2), Request("mid", (7, 0, 9), max_new_tokens=3)]
    engine = Runner(load_model(ck), EngineConfig(max_num_batched_tokens=16)).generate(requests)
    assert [o.token_ids for o in hf_generate(str(ck), requests)] == [o.token_ids for o in engine]
