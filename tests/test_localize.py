"""``harness.localize`` on hand-made captures: first layer and tensor, rows, owning ranks."""

from __future__ import annotations

import torch

from harness.localize import ACTIVATION_RTOL, localize, owner_ranks, row_ranges


def _capture(layers: int, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"{i}.{t}": torch.randn(rows, 8, generator=g) for i in range(layers) for t in ("residual", "hidden_states")}
    out["num_tokens"] = torch.tensor(rows)
    return out


def test_owner_ranks_split_the_padded_step() -> None:
    assert owner_ranks([0, 5, 6, 11], 12, 2) == [0, 1]
    assert owner_ranks([6, 7], 12, 2) == [1]
    assert owner_ranks([21], 22, 4) == [3]  # ceil(22 / 4) = 6 rows per shard: never a rank 4
    assert owner_ranks([3], 3, 4) == [3]


def test_first_layer_and_tensor_beyond_tolerance() -> None:
    base = _capture(3, 12)
    cand = {k: v.clone() for k, v in base.items()}
    cand["1.hidden_states"][7] += 1.0
    cand["2.residual"][0] += 1.0
    loc = localize(cand, base, tp=2, dtype="float32")
    assert (loc["layer"], loc["tensor"], loc["rows"], loc["tp_rank"]) == (1, "hidden_states", [7], 1)
    assert loc["per_layer_error"][0] == 0.0 and loc["per_layer_error"][1] > ACTIVATION_RTOL["float32"]


def test_noise_below_tolerance_is_not_localized() -> None:
    base = _capture(2, 8)
    cand = {k: v + 0.1 * ACTIVATION_RTOL["float32"] * v.abs().max() if k != "num_tokens" else v
            for k, v in base.items()}
    loc = localize(cand, base, tp=2, dtype="float32")
    assert loc["layer"] is None and max(loc["per_layer_error"]) < ACTIVATION_RTOL["float32"]


def test_rows_have_no_owner_without_sp() -> None:
    base = _capture(1, 8)
    cand = {k: v.clone() for k, v in base.items()}
    cand["0.residual"][6] += 1.0
    loc = localize(cand, base, tp=2, dtype="float32", token_sharded=False)
    assert loc["rows"] == [6] and loc["tp_ranks"] == [] and "tp_rank" not in loc and "no SP" in loc["shard_note"]


def test_a_missing_layer_is_named() -> None:
    base = _capture(3, 4)
    cand = {k: v for k, v in base.items() if not k.startswith("1.")}
    loc = localize(cand, base, tp=1, dtype="float32")
    assert loc["layer"] == 1 and "layer missing" in loc["note"]


def test_per_tensor_errors_match_the_localized_error_and_the_stage_is_named() -> None:
    base = _capture(4, 12)
    cand = {k: v.clone() for k, v in base.items()}
    cand["2.residual"][[0, 1, 2, 3, 8]] += 1.0
    cand["2.hidden_states"][[0, 1, 2, 3, 8]] += 5.0  # larger than the localized tensor's error
    loc = localize(cand, base, tp=2, dtype="float32", pp=2)
    assert (loc["layer"], loc["tensor"], loc["pp_stage"], loc["pp"]) == (2, "residual", 1, 2)
    assert loc["row_ranges"] == "0–3, 8"
    assert loc["per_tensor_error"]["residual"][2] == loc["max_error"]
    assert loc["per_layer_error"][2] == loc["per_tensor_error"]["hidden_states"][2] > loc["max_error"]
    assert "relative" in loc["error_unit"]
    assert localize(cand, base, tp=2, dtype="float32")["pp"] == 1
    assert "pp_stage" not in localize(cand, base, tp=2, dtype="float32")


def test_row_ranges() -> None:
    assert row_ranges(list(range(16)) + list(range(32, 48))) == "0–15, 32–47"
    assert row_ranges([]) == "" and row_ranges([4]) == "4" and row_ranges([2, 1]) == "1–2"
