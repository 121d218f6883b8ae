"""Localization: on a failed case, replay the failing request's prefill on both sides with
activation capture and name the first layer and tensor whose error exceeds the tolerance, the
token rows that differ, and the TP rank whose shard those rows belong to."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from reference_impl.parallel.pp import stage_layers

if TYPE_CHECKING:
    from harness.setup import ParallelSetup
    from reference_impl.requests import Request

Capture = Mapping[str, torch.Tensor]

# Per-layer error is measured relative to the baseline tensor's largest magnitude.
# fp32: TP/SP reorder sums only. Measured over the whole smoke matrix (`parity selftest --localize`,
# docs/detection.md): the largest clean per-layer error is 1.8e-6; a wrong row (another rank's
# residual, a missing bias) is off by 1e-2..1, and the subtlest catalogued bug (the SP norm's
# epsilon taken as 1e-6 instead of the config's 1e-2) moves layer 0 by 1.7e-4..3.3e-4. 2e-5 sits
# near the geometric middle: 11x above the clean noise and 8x below that bug's first layer, so
# the localizer names the layer where such a bug starts (at 1e-3 it named layer 3 for
# prompt-embeds and found nothing for multimodal and mixed).
# bf16: each layer rounds activations to 8 significand bits (2^-8 ~ 4e-3 relative); after a
# few layers clean differences reach ~1e-2, so 5e-2 flags only real divergence.
ACTIVATION_RTOL = {"float32": 2e-5, "bfloat16": 5e-2}
TENSORS = ("residual", "hidden_states")  # order of computation inside a layer
# What the errors (and ACTIVATION_RTOL) measure, recorded with every localization.
ERROR_UNIT = "relative: max |candidate - baseline| of a token row / max |baseline| of the tensor"


def merge_captures(per_rank: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One dict from every rank's capture (each stage's TP rank 0 answers for its layers)."""
    merged: dict[str, torch.Tensor] = {}
    for part in per_rank:
        merged.update(part)
    return merged


def _layers(captured: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({int(k.split(".")[0]) for k in captured if k[0].isdigit()})


def row_errors(candidate: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """(rows,) max |candidate - baseline| per token row, relative to max |baseline|."""
    scale = baseline.abs().max().clamp_min(1e-12)
    return ((candidate.float() - baseline.float()).abs().amax(dim=-1) / scale)


def owner_ranks(rows: list[int], num_tokens: int, tp: int) -> list[int]:
    """TP ranks whose token shard holds ``rows``: the step of ``num_tokens`` rows split in ``tp``
    shards of ``ceil(num_tokens / tp)`` rows (SP pads the step to a multiple of tp, so the shards
    are then equal)."""
    local = max(-(-num_tokens // tp), 1)
    return sorted({min(r // local, tp - 1) for r in rows})


def localize(candidate: Mapping[str, torch.Tensor], baseline: Mapping[str, torch.Tensor],
             tp: int, dtype: str, token_sharded: bool = True, pp: int = 1) -> dict[str, Any]:
    """The first (layer, tensor) beyond tolerance, with rows, owning TP ranks, the PP stage that
    runs the layer, and per-layer errors. ``token_sharded``: whether the candidate splits token
    rows over its TP ranks (SP); without it every rank holds every row, so rows have no owning
    rank.

    Errors are relative (``ERROR_UNIT``): per token row max |candidate - baseline| over the
    baseline tensor's max |value|. ``per_tensor_error[tensor][layer]`` is that tensor's largest
    row error (``None``: not computed), ``max_error`` the localized tensor's at its layer (the
    same number), ``per_layer_error`` the larger of a layer's tensors."""
    rtol = ACTIVATION_RTOL[dtype]
    num_tokens = int(candidate.get("num_tokens", torch.tensor(0)))
    layers = _layers(baseline)
    per_tensor: dict[str, list[float | None]] = {t: [] for t in TENSORS}
    found: dict[str, Any] | None = None
    for layer in layers:
        for tensor in TENSORS:
            key = f"{layer}.{tensor}"
            if key not in candidate:
                per_tensor[tensor].append(None)
                found = found or {"layer": layer, "tensor": tensor, "rows": [], "tp_ranks": [],
                                  "max_error": None, "note": f"candidate computed no {key}: layer missing"}
                continue
            errors = row_errors(candidate[key], baseline[key])
            per_tensor[tensor].append(float(errors.max()))
            bad = [int(i) for i in torch.nonzero(errors > rtol).flatten()]
            if bad and found is None:
                found = {"layer": layer, "tensor": tensor, "rows": bad, "row_ranges": row_ranges(bad),
                         "tp_ranks": owner_ranks(bad, num_tokens, tp) if token_sharded and tp > 1 else [],
                         "max_error": float(errors.max())}
                if not token_sharded and tp > 1:
                    found["shard_note"] = "no SP: every TP rank holds every token row"
    per_layer = [max((e for e in (per_tensor[t][i] for t in TENSORS) if e is not None), default=0.0)
                 for i in range(len(layers))]
    result: dict[str, Any] = found or {"layer": None, "tensor": None, "rows": [], "tp_ranks": [],
                                       "note": "no layer's activations differ beyond tolerance in the prefill"}
    result.update({"per_layer_error": per_layer, "per_tensor_error": per_tensor, "error_unit": ERROR_UNIT,
                   "rtol": rtol, "num_tokens": num_tokens, "tp": tp, "pp": pp})
    if found is not None and found["tp_ranks"]:
        result["tp_rank"] = found["tp_ranks"][0] if len(found["tp_ranks"]) == 1 else found["tp_ranks"]
    if found is not None and pp > 1 and layers:
        result["pp_stage"] = next(s for s, r in enumerate(stage_layers(len(layers), pp)) if found["layer"] in r)
    return result


def row_ranges(rows: Sequence[int]) -> str:
    """Token rows as ranges: ``[0, 1, 2, 3, 8]`` -> ``"0–3, 8"``."""
    spans: list[list[int]] = []
    for r in sorted(set(rows)):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)


def localize_replay(setup: ParallelSetup, dtype: str, requests: Sequence[Request], request_id: str,
                    capture_candidate: Callable[[], Sequence[Capture]],
                    capture_baseline: Callable[[], Sequence[Capture]]) -> dict[str, Any]:
    """Localize a failed case of ``setup``: each side's capture of the batch's prefill (the failing
    request with the requests it was batched with, in one step; every rank's part), then
    ``localize``, with the failing request and the requests whose rows differ. A replay that
    fails (a rank raised: ``WorkerError``) is reported as a note, not raised."""
    try:
        cand = merge_captures(capture_candidate())
        base = merge_captures(capture_baseline())
    except RuntimeError as exc:  # WorkerError included
        return {"note": f"localization replay failed: {str(exc).splitlines()[0]}", "error": str(exc)}
    result = localize(cand, base, setup.tp, dtype, token_sharded=setup.sp, pp=setup.pp)
    result["failing_request"] = request_id
    result["row_requests"] = sorted({requests[i].request_id for i in requests_of_rows(result["rows"], cand)})
    return result


def requests_of_rows(rows: list[int], captured: Mapping[str, Any]) -> list[int]:
    """Indices of the requests whose prompt rows (per the capture's offsets) include ``rows``."""
    offsets = [int(x) for x in captured.get("offsets", [])]
    return sorted({i for r in rows for i in range(len(offsets) - 1) if offsets[i] <= r < offsets[i + 1]})
