"""The engine interface and the transformers TP engine: setups on engines, planning (skips with
reasons, cross-engine cases), who raised, the baseline key, and the adapter against transformers'
own ``generate`` at tp=1. The cases over real ranks are tests/test_transformers_tp.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from harness.baseline import BaselineCache, hf_generate
from harness.case import HF_BASELINE, is_oracle
from harness.engines import ENGINES, build_engine, get_engine, kind_of, transformers_tp
from harness.engines.greedy import record_step
from harness.engines.transformers_tp import TransformersSpec
from harness.launch.base import WorkerError
from harness.localize import localize
from harness.matrix import get_matrix
from harness.outcome import with_layout, worker_failure
from harness.plan import RunOptions, plan
from harness.setup import ParallelSetup
from reference_impl.config import load_config
from reference_impl.engine import EngineSpec
from reference_impl.requests import Request, RequestOutput
from scenarios.models import checkpoint

from helpers import TP_ATOL, differences, scenario_requests

TRANSFORMERS_TRACEBACK = '''Traceback (most recent call last):
  File "/repo/harness/launch/worker.py", line 70, in generate
    outputs = engine.generate(requests)
  File "/repo/harness/engines/transformers_engine.py", line 91, in _generate_one
    result = self.model(**self._prompt_inputs(req), use_cache=True)
  File "/venv/lib/python3.11/site-packages/transformers/models/qwen2/modeling_qwen2.py", line 200, in forward
    key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
RuntimeError: shape '[1, 7, -1, 16]' is invalid for input of size 56
'''


def test_setup_ids_name_their_engine_and_parse_back() -> None:
    tf = ParallelSetup(tp=2, engine="transformers")
    assert tf.id == "tp2-eager@transformers" and tf.layout_id == "tp2-eager"
    assert ParallelSetup.parse("tp2-eager@transformers") == tf
    assert ParallelSetup.parse("tp2-eager", engine="transformers") == tf  # an id without @ takes the run's
    assert ParallelSetup(tp=2).id == "tp2-eager"  # the reference engine's ids are unchanged
    assert tf.auto_baseline() == ParallelSetup(engine="transformers")  # the same engine on one device
    assert tf.differences(ParallelSetup(tp=2)) == ["engine"]
    with pytest.raises(ValueError, match="unknown engine 'vllm'"):
        ParallelSetup(tp=2, engine="vllm")


def test_specs_build_the_engine_their_type_names() -> None:
    ck = str(checkpoint("tiny-llama"))
    assert isinstance(ParallelSetup(tp=2, engine="transformers").build_spec(ck), TransformersSpec)
    assert isinstance(ParallelSetup(tp=2).build_spec(ck), EngineSpec)
    assert kind_of(TransformersSpec(ck, 2)).name == "transformers" and kind_of(EngineSpec(ck)).name == "reference"


def _plan(model: str, **options: Any) -> dict[str, str | None]:
    planned = plan(get_matrix("smoke"), RunOptions(backend="mp", model=model, engine="transformers", **options))
    return {p.case.id: p.skip_reason for p in planned}


def test_plan_skips_what_transformers_cannot_express_and_adds_cross_engine_cases() -> None:
    cases = _plan("tiny-qwen2")
    assert "cannot express pp=2" in (cases["tiny-qwen2/tp2-pp2-eager@transformers-text"] or "")
    assert "cannot express SP" in (cases["tiny-qwen2/tp2-sp-graph-full@transformers-text"] or "")
    # One KV head under tp2 and tp4 is not skipped: what transformers does with it is under test.
    for tp in (2, 4):
        assert cases[f"tiny-qwen2/tp{tp}-eager@transformers-text"] is None
        assert cases[f"tiny-qwen2/tp{tp}-eager@transformers-text-vs-reference"] is None
    assert cases["tiny-qwen2/tp1-pp1-eager@transformers-text"] is None  # the oracle: the adapter vs generate
    assert is_oracle("tp1-pp1-eager@transformers", HF_BASELINE)
    assert "needs images" in (cases["tiny-qwen2/tp2-eager@transformers-multimodal"] or "")
    compiled = ParallelSetup(tp=2, compile="graph", engine="transformers")
    assert "runs eager only" in (get_engine("transformers").unsupported(compiled) or "")
    assert get_engine("reference").unsupported(compiled) is None


def test_an_explicit_baseline_may_name_the_reference_engine() -> None:
    planned = plan(get_matrix("smoke"), RunOptions(backend="mp", model="tiny-llama", engine="transformers",
                                                    baseline="tp2-eager@reference"), ["tp2-eager"], ["text"])
    assert [p.case.id for p in planned] == ["tiny-llama/tp2-eager@transformers-text-vs-reference"]
    assert planned[0].case.baseline == ParallelSetup(tp=2)


def test_mutations_patch_only_the_reference_engine() -> None:
    with pytest.raises(ValueError, match="cannot be combined with --engine transformers"):
        RunOptions(engine="transformers", mutation="kv-heads-not-replicated")


def test_an_exception_in_transformers_is_the_engines_fail_with_its_layout() -> None:
    paths = get_engine("transformers").code_paths
    status, reason = worker_failure(WorkerError(1, TRANSFORMERS_TRACEBACK), "candidate", "tp2-eager@transformers",
                                    code_paths=paths)
    assert status == "fail"
    assert reason.startswith("engine raised in candidate tp2-eager@transformers, rank 1: RuntimeError: shape "
                             "'[1, 7, -1, 16]' is invalid for input of size 56 (at transformers/models/qwen2/")
    # Judged as the reference engine's, the same traceback has no engine frame: infrastructure.
    assert worker_failure(WorkerError(1, TRANSFORMERS_TRACEBACK), "candidate", "tp2-eager")[0] == "error"
    explained = with_layout(reason, load_config(checkpoint("tiny-qwen2")).text, 2)
    assert explained.splitlines()[0] == reason.splitlines()[0]
    layout = explained.splitlines()[1]
    assert "num_key_value_heads=1" in layout and "fewer KV heads than TP ranks" in layout
    assert "8 of one head's 16 features" in layout


def test_baseline_key_of_the_transformers_engine_follows_its_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    ck = str(checkpoint("tiny-llama"))
    reqs = [Request("r", (1, 2, 3))]
    tf_key = BaselineCache.key(ck, reqs, TransformersSpec(ck), "float32", "cpu")
    assert tf_key != BaselineCache.key(ck, reqs, EngineSpec(ck), "float32", "cpu")
    assert "transformers=" in transformers_tp.identity()
    other = replace(get_engine("transformers"), identity=lambda: "transformers/transformers=9.9/other-source")
    monkeypatch.setitem(ENGINES, "transformers", other)
    assert BaselineCache.key(ck, reqs, TransformersSpec(ck), "float32", "cpu") != tf_key


def test_greedy_step_ties_go_to_the_lowest_id_and_forcing_keeps_the_top_k() -> None:
    logits = torch.tensor([0.0, 3.0, 3.0, 1.0])
    out = RequestOutput("r", 1)
    assert record_step(logits, Request("r", (0,), top_k=2), out) == 1
    forced = RequestOutput("r", 1)
    assert record_step(logits, Request("r", (0,), top_k=2, max_new_tokens=1, forced_tokens=(3,)), forced) == 3
    assert forced.top_logprobs[0][0][0] == 1 and forced.logprobs[0] < out.logprobs[0]


@pytest.mark.parametrize("model, scenario", [("tiny-qwen2", "text"), ("tiny-llava", "mixed")])
def test_the_adapter_at_tp1_matches_transformers_generate(model: str, scenario: str) -> None:
    """Its own forward passes over its KV cache (ids, prompt-embeds, images through pixel_values)
    against transformers' ``generate``: tokens identical, logprobs within the fp32 tolerance."""
    ck = str(checkpoint(model))
    reqs = scenario_requests(scenario, model)
    engine = build_engine(TransformersSpec(ck), torch.device("cpu"))
    assert differences(engine.generate(reqs), hf_generate(ck, reqs), TP_ATOL) == {}


def test_capture_is_the_reference_engines_tensors_and_localizes_a_perturbed_layer() -> None:
    """Forward hooks capture what the reference engine captures (so the localizer compares the
    two engines layer by layer); a perturbed layer of the transformers model is named."""
    ck = str(checkpoint("tiny-llama"))
    reqs = scenario_requests("text", "tiny-llama")[:3]
    ours = build_engine(TransformersSpec(ck), torch.device("cpu"))
    reference = build_engine(EngineSpec(ck), torch.device("cpu")).capture_prefill(reqs)
    clean = ours.capture_prefill(reqs)
    assert set(clean) == set(reference) and torch.equal(clean["offsets"], reference["offsets"])
    assert localize(clean, reference, 1, "float32")["layer"] is None
    layer = ours.decoder_layers()[2]  # type: ignore[attr-defined]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.mul_(1.01)
    found = localize(ours.capture_prefill(reqs), reference, 1, "float32")
    assert (found["layer"], found["tensor"]) == (2, "residual")


def test_transformers_spec_checks_itself() -> None:
    with pytest.raises(ValueError, match="tp=0"):
        TransformersSpec("x", 0)
    with pytest.raises(ValueError, match="holds no config.json"):
        replace(TransformersSpec("/nonexistent"), tp=2).validate()
