"""``--fit``: a matrix's setups moved to the TP degrees a model's head counts allow."""

from __future__ import annotations

from dataclasses import replace

import pytest

from harness.fit import fit_setup, fitting_setups
from harness.matrix import get_matrix
from harness.plan import RunOptions, plan
from harness.setup import ParallelSetup
from reference_impl.config import ModelConfig, config_from_dict
from scenarios.models import MODELS


def config_of(name: str) -> ModelConfig:
    """A built-in model's engine config from its spec, without building the checkpoint."""
    return config_from_dict({"architectures": ["LlamaForCausalLM"], **MODELS[name].text})


NINE_HEADS = config_of("tiny-llama-9h")


def test_nine_head_model_takes_tp3_only() -> None:
    text = NINE_HEADS.text
    assert (text.num_heads, text.num_kv_heads, text.vocab_size, text.intermediate_size) == (9, 3, 576, 384)
    assert fitting_setups(["tp1-pp1-eager", "tp2-eager", "tp3-eager", "tp9-eager"], NINE_HEADS, None) == [
        "tp1-pp1-eager", "tp3-eager"]  # tp9 does not divide intermediate 384: nearest valid is tp3


@pytest.mark.parametrize("setup_id", ["tp2-eager", "tp4-eager"])
def test_tp2_and_tp4_fit_to_tp3(setup_id: str) -> None:
    fitted = fit_setup(ParallelSetup.parse(setup_id), NINE_HEADS, None)
    assert fitted is not None and fitted.id == "tp3-eager"


def test_fit_keeps_everything_but_tp() -> None:
    setup = ParallelSetup.parse("tp2-pp2-sp-graph-piecewise-spmin16-nochunk", "bfloat16", "cuda")
    assert fit_setup(setup, NINE_HEADS, None) == replace(setup, tp=3)


def test_pp_is_clamped_to_the_layer_count() -> None:
    fitted = fit_setup(ParallelSetup.parse("tp2-pp8-eager"), NINE_HEADS, None)
    assert fitted is not None and (fitted.tp, fitted.pp) == (3, NINE_HEADS.text.num_layers)


@pytest.mark.parametrize("setup_id", ["tp3-sp-graph-full", "tp1-pp1-eager", "tp3-pp2-eager"])
def test_a_setup_that_fits_comes_back_unchanged(setup_id: str) -> None:
    setup = ParallelSetup.parse(setup_id)
    assert fit_setup(setup, NINE_HEADS, None) == setup


def test_tie_goes_to_the_smaller_degree() -> None:
    # tiny-llama (4 heads, 2 KV heads) takes tp 1, 2 and 4: tp3 is as near to 2 as to 4.
    fitted = fit_setup(ParallelSetup.parse("tp3-eager"), config_of("tiny-llama"), None)
    assert fitted is not None and fitted.tp == 2


@pytest.mark.parametrize(("setup_id", "max_ranks"), [("tp2-eager", 2), ("tp2-pp2-eager", 5)])
def test_none_when_no_degree_fits_the_ranks(setup_id: str, max_ranks: int) -> None:
    assert fit_setup(ParallelSetup.parse(setup_id), NINE_HEADS, max_ranks) is None


def test_fitting_setups_deduplicates_in_order() -> None:
    ids = ["tp4-eager", "tp2-sp-graph-full", "tp2-eager", "tp4-sp-graph-full"]
    assert fitting_setups(ids, NINE_HEADS, None) == ["tp3-eager", "tp3-sp-graph-full"]
    assert fitting_setups(ids, NINE_HEADS, 2) == []


def test_plan_with_fit_runs_fitted_setups_once() -> None:
    options = RunOptions(backend="mp", model="tiny-llama-9h", fit=True)
    planned = plan(get_matrix("smoke"), options, ["tp2-eager", "tp4-eager"], ["text"])
    assert [(p.case.setup.id, p.case.baseline_id, p.skip_reason) for p in planned] == [
        ("tp3-eager", "tp1-pp1-eager", None)]
    unfitted = plan(get_matrix("smoke"), replace(options, fit=False), ["tp2-eager", "tp4-eager"], ["text"])
    assert [p.case.setup.id for p in unfitted] == ["tp2-eager", "tp4-eager"]
    assert all(p.skip_reason and "num_attention_heads=9" in p.skip_reason for p in unfitted)
