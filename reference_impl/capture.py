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
