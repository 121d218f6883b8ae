"""Pipeline parallelism: keep one stage's contiguous range of layers.

The first stage keeps the embedding (and, for LLaVA, the vision tower and projector); the last
keeps the final norm and the LM head. Layers keep their ``ModuleDict`` keys, so parameter names
are unchanged.
"""

from __future__ import annotations

from reference_impl.model import CausalLM


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous, covering, non-overlapping layer ranges; earlier stages take the remainder."""
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for stage in range(pp):
        size = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def split_stages(model: CausalLM, pp: int, pp_rank: int) -> CausalLM:
    """Drop, in place, every part of ``model`` that does not belong to stage ``pp_rank``."""
    if pp == 1:
        return model
    keep = stage_layers(model.cfg.text.num_layers, pp)[pp_rank]
    for key in list(model.model.layers.keys()):
        if int(key) not in keep:
            del model.model.layers[key]
    if pp_rank != 0:
        model.model.embed_tokens = None
        model.vision_tower = None
        model.multi_modal_projector = None
    if pp_rank != pp - 1:
        model.model.norm = None
        model.lm_head = None
    return model
