"""``--fit``: run a matrix's shape on a model whose head counts its TP degrees do not divide.

A matrix names TP degrees (tp2, tp4) that suit the built-in models; a model with 9 attention
heads (SmolLM2-135M) takes none of them, so every case would be skipped. ``fit_setup`` keeps
everything a setup tests except the TP degree, which it moves to the nearest one the model allows
(tp2 -> tp3 for 9 heads). The fitted setup has its own id, so reports show what actually ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from harness.setup import ParallelSetup
from reference_impl.config import ModelConfig
from reference_impl.parallel.validate import validate_parallel

# A setup that tests tensor parallelism keeps testing it: a fitted TP degree is never 1 when the
# original was larger (tp1 would silently turn a TP check into a single-device one).
MIN_FITTED_TP = 2


def _fits(cfg: ModelConfig, tp: int, pp: int) -> bool:
    """Does the engine accept ``tp`` x ``pp`` for this model (heads, KV heads, sizes, layers)?"""
    try:
        validate_parallel(cfg, tp, pp)
    except ValueError:
        return False
    return True


def _tp_candidates(setup: ParallelSetup, cfg: ModelConfig, pp: int, max_ranks: int | None) -> list[int]:
    """TP degrees the model takes at ``pp`` within ``max_ranks`` ranks; at least ``MIN_FITTED_TP``
    when the setup's own tp is. A TP degree must divide the head count, so it is at most that."""
    low = MIN_FITTED_TP if setup.tp >= MIN_FITTED_TP else 1
    return [tp for tp in range(low, cfg.text.num_heads + 1)
            if (max_ranks is None or tp * pp <= max_ranks) and _fits(cfg, tp, pp)]


def fit_setup(setup: ParallelSetup, cfg: ModelConfig, max_ranks: int | None) -> ParallelSetup | None:
    """``setup`` with its TP degree replaced by the valid one nearest to it, or None if none fits.

    PP is kept (clamped to the layer count); SP, compile mode, partition, chunking, SP threshold,
    dtype and device are kept. Valid: ``validate_parallel`` accepts it, tp >= 2 when the original
    tp was, and tp * pp <= ``max_ranks`` when given. A tie (tp4 between tp3 and tp5) goes to the
    smaller degree: fewer ranks, so cheaper on CPU and more often within a GPU host's count.
    A setup that already fits comes back unchanged.
    """
    pp = min(setup.pp, cfg.text.num_layers)
    candidates = _tp_candidates(setup, cfg, pp, max_ranks)
    if not candidates:
        return None
    tp = min(candidates, key=lambda t: (abs(t - setup.tp), t))
    return replace(setup, tp=tp, pp=pp)


def fitting_setups(setup_ids: Sequence[str], cfg: ModelConfig, max_ranks: int | None) -> list[str]:
    """Ids of the fitted setups of ``setup_ids`` (those that fit at all), deduplicated, order kept."""
    fitted: dict[str, None] = {}
    for setup_id in setup_ids:
        fit = fit_setup(ParallelSetup.parse(setup_id), cfg, max_ranks)
        if fit is not None:
            fitted.setdefault(fit.id, None)
    return list(fitted)


__all__ = ["MIN_FITTED_TP", "fit_setup", "fitting_setups"]
