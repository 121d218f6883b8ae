"""Synthetic result records for the report's tests (tests/test_report.py, tests/test_report_browser.py):
the shapes a real run writes (``results.jsonl`` lines, ``summary.json``'s ``"run"`` and
``"history"``, ``accuracy.json``), with passes, failures (two starting in the same place, one
elsewhere), an error, a skip, and a grid cell holding two cases."""

from __future__ import annotations

from typing import Any

MODEL = "tiny-llama"
RUN: dict[str, Any] = {
    "matrix": "smoke", "setups": ["tp2-eager", "tp2-sp-graph-full", "tp2-pp2-sp-graph-full", "tp2-pp2-eager",
                                  "tp4-eager"],
    "scenarios": ["text", "prompt_embeds", "mixed"], "model": MODEL, "checkpoint_hash": "c0ffee",
    "baseline": "auto", "policy": "auto",
    "tolerances": {"logprob_atol": 1e-3, "topk_atol": 1e-3, "near_tie": 1e-3, "identical_atol": 1e-6, "max_flips": 1},
    "dtype": "float32", "device": "cpu", "backend": "ray", "seed": 0, "mutation": None,
    "command": "parity run --matrix smoke", "version": "0.1.0", "git_sha": "0123abc",
}
ENV = {"git_sha": "0123456789abcdef0123456789abcdef01234567", "python": "3.11.7", "torch": "2.13.0",
       "transformers": "5.0", "ray": "2.40", "platform": "Linux", "hostname": "box", "cpu_count": 2,
       "cuda_devices": [], "timestamp": "2026-11-29T12:00:00+00:00"}
METRICS = {"requests": 3, "steps_compared": 48, "max_logprob_diff": 0.201, "atol": 1e-3, "topk_atol": 1e-3,
           "dtype": "float32", "policy": "logprobs"}
# Where the two SP failures start: 32 token rows of the first prefill step, rank 1's shard.
SHARED_ROWS = list(range(0, 16)) + list(range(32, 48))


def localization(layer: int, tensor: str, rows: list[int], rank: int, stage: int, error: float) -> dict[str, Any]:
    """A localization as ``harness.localize`` records it (4 layers, 2 PP stages)."""
    per_tensor: dict[str, list[float | None]] = {"residual": [1e-7, 2e-7, 1e-7, 3e-7],
                                                 "hidden_states": [1e-7, 1e-7, 2e-7, 2e-7]}
    for later in range(layer, 4):
        per_tensor[tensor][later] = error * (1 + later - layer)
    other = "hidden_states" if tensor == "residual" else "residual"
    for later in range(layer + 1, 4):
        per_tensor[other][later] = error
    return {
        "layer": layer, "tensor": tensor, "rows": rows, "tp_ranks": [rank], "tp_rank": rank,
        "max_error": error, "per_layer_error": [max(v for v in (r, h) if v is not None)
                                                for r, h in zip(per_tensor["residual"], per_tensor["hidden_states"])],
        "per_tensor_error": per_tensor, "error_unit": "relative", "rtol": 2e-5, "num_tokens": 70, "tp": 2,
        "pp": 2, "pp_stage": stage, "failing_request": "pe0", "row_requests": ["pe0", "pe1"],
    }


def divergence(request: str, step: int, base: int, cand: int, diff: float, texts: bool = False) -> dict[str, Any]:
    """One request's first failing divergence with both token streams (16 tokens)."""
    base_stream = [100 + i for i in range(16)]
    cand_stream = base_stream[:step] + [cand] + [200 + i for i in range(step + 1, 16)]
    base_stream[step] = base
    out: dict[str, Any] = {
        "request_id": request, "step": step, "candidate_token": cand, "baseline_token": base,
        "candidate_top_k": [[cand, -0.4], [base, -0.6], [7, -3.0]],
        "baseline_top_k": [[base, -0.3], [cand, -0.8], [7, -3.1]],
        "candidate_logprob": -0.4, "baseline_logprob": -0.3, "logprob_diff": diff, "reason": "token",
        "tolerated": False, "candidate_gap": 0.2, "baseline_gap": 0.5, "replayed": False,
        "detail": "policy identical tolerates no flip", "failing_in_request": 1,
        "baseline_tokens": base_stream, "candidate_tokens": cand_stream, "candidate_stream": "free",
    }
    if texts:
        out["token_text"] = {str(t): f"w{t}" for t in {*base_stream, *cand_stream, 7}}
        out["token_text"][str(base)] = " Paris"
        out["token_text"][str(cand)] = " Rome"
    return out


def record(setup: str, scenario: str, status: str, baseline: str = "", **fields: Any) -> dict[str, Any]:
    rec = {"id": f"{MODEL}/{setup}-{scenario}", "setup": setup, "baseline": baseline or _baseline(setup),
           "scenario": scenario, "model": MODEL, "status": status, "reason": "", "first_divergence": None,
           "localization": None, "sp_matches": None, "metrics": {}, "seconds": 1.5}
    rec.update(fields)
    return rec


def _baseline(setup: str) -> str:
    return setup.replace("-sp", "") if "-sp" in setup else "tp1-pp1-eager"


def failure(setup: str, scenario: str, loc: dict[str, Any], divs: list[dict[str, Any]]) -> dict[str, Any]:
    return record(setup, scenario, "fail", reason=f"FAIL [policy identical]: request {divs[0]['request_id']} ...",
                  first_divergence={k: v for k, v in divs[0].items() if k not in (
                      "failing_in_request", "baseline_tokens", "candidate_tokens", "candidate_stream", "token_text")},
                  localization=loc, divergences=divs, metrics=METRICS, seconds=4.0)


def review_records() -> list[dict[str, Any]]:
    """Passes, three failures (two sharing layer 0 / residual / TP rank 1 / PP stage 0), an
    error, a skip; the tp2-eager x text cell holds two cases (two baselines)."""
    shared = localization(0, "residual", SHARED_ROWS, 1, 0, 0.201)
    return [
        record("tp2-eager", "text", "pass", metrics=METRICS | {"max_logprob_diff": 2e-5}),
        record("tp2-eager", "text", "pass", baseline="hf", id=f"{MODEL}/tp2-eager-text-vs-hf"),
        record("tp2-eager", "prompt_embeds", "pass"),
        record("tp2-eager", "mixed", "pass"),
        failure("tp2-sp-graph-full", "prompt_embeds", shared,
                [divergence("pe0", 0, 17, 42, 0.201, texts=True), divergence("pe1", 0, 18, 43, 0.15, texts=True)]),
        record("tp2-sp-graph-full", "text", "pass"),
        failure("tp2-sp-graph-full", "mixed", localization(0, "residual", SHARED_ROWS, 1, 0, 0.187),
                [divergence("mx2", 1, 19, 44, 0.187)]),
        failure("tp2-pp2-sp-graph-full", "text", localization(2, "hidden_states", [3, 4, 5, 9], 0, 1, 0.034),
                [divergence("t1", 5, 20, 45, 0.034)]),
        record("tp2-pp2-eager", "mixed", "error",
               reason="infrastructure: candidate tp2-pp2-eager, rank 3 died: worker process exited with code -9"),
        record("tp4-eager", "mixed", "skip", reason="tp4-eager needs 4 cpu devices; 2 available"),
    ]


HISTORY: dict[str, Any] = {
    "previous": ["runs/2026-11-28", "runs/2026-11-27"],
    "cases": {
        f"{MODEL}/tp2-sp-graph-full-prompt_embeds": {"class": "recurring", "flaky": False, "failures": 3, "runs": 3},
        f"{MODEL}/tp2-sp-graph-full-mixed": {"class": "new", "flaky": False, "failures": 1, "runs": 3},
        f"{MODEL}/tp2-pp2-sp-graph-full-text": {"class": "recurring", "flaky": True, "failures": 2, "runs": 3},
        f"{MODEL}/tp2-eager-text": {"class": "pass", "flaky": False, "failures": 0, "runs": 3},
    },
    "fixed": [f"{MODEL}/tp2-graph-full-text"],
}

ACCURACY: dict[str, Any] = {
    "task": "gsm_arith", "model": "tiny-gsm", "input": "tokens", "dtype": "float32", "limit": 50,
    "baselines": [{"task": "gsm_arith", "id": "tp1-pp1-eager", "n": 50, "accuracy": 0.62, "seconds": 12.0}],
    "setups": [{"task": "gsm_arith", "id": "tp2-eager", "baseline": "tp1-pp1-eager", "accuracy": 0.62, "delta": 0.0,
                "changed": {"to_correct": 0, "to_wrong": 0}, "p_value": 1.0, "verdict": "pass", "reason": ""}],
}


def many_records(n: int) -> list[dict[str, Any]]:
    """``n`` cases over 20 setups x 10 scenarios: mostly passes, every 9th a failure (three
    localizations), every 23rd an error, every 31st a skip."""
    out = []
    for i in range(n):
        setup, scenario = f"tp2-pp{1 + i // 10 % 20}-sp-graph-full", f"scenario{i % 10}"
        if i % 9 == 4:
            out.append(failure(setup, scenario, localization(i % 3, "residual", SHARED_ROWS, 1, 0, 0.1 + i / 1000),
                               [divergence("r0", 0, 17, 42, 0.1), divergence("r1", 2, 18, 43, 0.05)]))
        elif i % 23 == 5:
            out.append(record(setup, scenario, "error", reason="infrastructure: timed out"))
        elif i % 31 == 6:
            out.append(record(setup, scenario, "skip", reason="needs 4 devices"))
        else:
            out.append(record(setup, scenario, "pass", metrics=METRICS))
    return out
