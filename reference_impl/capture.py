"""Activation capture for localization: ``parity::capture`` records a layer's post-attention
``hidden_states`` (the normed MLP input) and ``residual`` (the residual stream after the
attention add), gathered to full length over the TP group when SP left them token-sharded.

It is an opaque op that returns copies of its inputs, so it sits in a compiled graph without
disturbing the SP patterns (it only adds users to pattern outputs). The model calls it only
while a layer's ``capture`` flag is set (a separate compiled graph).
"""

from __future__ import annotations

import torch

STORE: dict[str, torch.Tensor] = {}


def _full(x: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(num_tokens / tp, H) shard -> (num_tokens, H); a full tensor is returned as is."""
    from reference_impl.parallel import collectives  # the parallel package imports the model
    from reference_impl.parallel.groups import current_state

    state = current_state()
    if x.shape[0] == num_tokens or state.tp == 1:
        return x
    return collectives.all_gather(x.contiguous(), state.tp, state.tp_group_name)


# ``mutates_args=()`` although the op writes ``STORE`` and all-gathers over the TP group: it
# mutates none of its arguments (``STORE`` is a module dict, not an argument, and the inputs are
# only read and copied). Why a compiled graph keeps it and its collective in place:
# - the op is opaque, and its fake writes nothing, so tracing records no capture;
# - it returns copies that replace ``hidden`` and ``residual`` in the layer (``DecoderLayer``),
#   so the rest of the model consumes them: never dead code, and every later node (every later
#   collective included) depends on it, every earlier one it depends on; all ranks run the same
#   graph, so the all-gather is issued at the same point on each;
# - each layer passes its own index, so no two calls are merged as common subexpressions.
# tests/test_compile_units.py::test_side_effect_ops_stay_in_compiled_graphs checks that the
# compiled capture graph keeps one op per layer and stores what eager stores.
@torch.library.custom_op("parity::capture", mutates_args=())
def capture(hidden: torch.Tensor, residual: torch.Tensor, layer: int, num_tokens: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    STORE[f"{layer}.hidden_states"] = _full(hidden, num_tokens).detach().float().cpu()
    STORE[f"{layer}.residual"] = _full(residual, num_tokens).detach().float().cpu()
    return hidden.clone(), residual.clone()


@capture.register_fake
def _capture_fake(hidden: torch.Tensor, residual: torch.Tensor, layer: int, num_tokens: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(hidden), torch.empty_like(residual)
