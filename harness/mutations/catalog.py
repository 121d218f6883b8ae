"""The mutation catalog: named historical bug classes of parallel inference engines.

Each ``Mutation`` names a patch in ``harness.mutations.patches`` that re-introduces one bug into
the engine under test, inside a worker process (``Worker.mutate(name)``). A harness whose checks
are worth anything must tell every mutated engine from the clean one on some input; the
descriptions say which inputs expose each bug.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

PATCHES_MODULE = "harness.mutations.patches"


@dataclass(frozen=True)
class Mutation:
    """One bug class and the patch that re-introduces it."""

    name: str  # kebab-case, unique
    summary: str  # one line
    description: str  # what the bug is, why it is wrong, which inputs expose it
    reference: str  # the public reference ("vLLM #33322") or "class" for a generic bug class
    target: str  # "module:function", called as function(worker) inside each rank's process
    needs_rebuild: bool  # the patch acts at engine construction or compile-time tracing
    # The bug sits in code every setup shares (the single-device path): it is applied to the
    # baselines' workers too, as it would be in a real engine, so only the oracle case (the
    # engine against Hugging Face transformers) can tell.
    shared: bool = False

    def load(self) -> Callable[[object], None]:
        """The patch function named by ``target``."""
        module_name, _, attr = self.target.partition(":")
        fn: Callable[[object], None] = getattr(importlib.import_module(module_name), attr)
        return fn


def _target(name: str) -> str:
    return f"{PATCHES_MODULE}:{name.replace('-', '_')}"


def _mutation(name: str, reference: str, needs_rebuild: bool, summary: str, description: str,
              shared: bool = False) -> Mutation:
    return Mutation(name, summary, " ".join(description.split()), reference, _target(name), needs_rebuild, shared)


_MUTATIONS = [
    _mutation(
        "sp-middle-residual-slice", "vLLM #33322", False,
        "SP Middle pattern slices the full-length residual as rows [0:local_len] on every rank.",
        """When the residual reaching a Middle sequence-parallel match is still full length (the
        embedding ran outside the graph: prompt-embeds and multimodal steps, or a previous pipeline
        stage handed it over), each rank must keep its own rows ``[rank * n, (rank + 1) * n)``.
        Taking ``[0:n]`` on every rank gives all ranks the first rank's tokens, so the all-gathered
        activations repeat the first shard and every later token attends from a wrong residual.
        Text-only steps with the embedding inside the graph never hit it (the First pattern
        already shards the residual); prompt-embeds, multimodal and mixed batches under SP do.""",
    ),
    _mutation(
        "pp-handoff-residual-slice", "vLLM #33322", False,
        "PP hand-off copies the token-sharded residual into rows [0:local_len] of a zero buffer.",
        """A pipeline stage whose graph ran sequence-parallel ends with the residual token-sharded
        ``(T / tp, H)``; the next stage needs it full length, so the sender must all-gather it.
        Writing the shard into the first rows of a zero ``(T, H)`` buffer instead sends every
        rank's own shard as if it were tokens ``[0, T / tp)`` and zeros for the rest, so the
        next stage adds a wrong residual to most tokens. Only SP with PP > 1 exposes it: without
        SP the residual is never sharded and the hand-off is a plain copy.""",
    ),
    _mutation(
        "sp-threshold-ignored-in-handoff", "vLLM #55464", False,
        "The runner's scattered-residual predicate ignores sp_min_tokens.",
        """The compiled graph applies SP only to steps of at least ``sp_min_tokens`` tokens, so a
        small step (decode) hands out a full-length residual. If the runner decides whether to
        all-gather the residual from ``sp`` and ``tp`` alone, it all-gathers an already full
        residual on small steps (``tp * T`` rows; the reference runner detects the row mismatch
        and raises). Needs SP with PP > 1, ``sp_min_tokens`` above the decode step size, and a
        step below the threshold: any generation that decodes.""",
    ),
    _mutation(
        "token-count-not-padded-to-tp", "class", True,
        "Step token counts are padded to buckets that are not multiples of tp.",
        """Sequence parallelism splits a step's tokens evenly over the TP ranks, so every padded
        step size must be a multiple of ``tp``. With unrounded buckets a step of another size (a
        lone decoding sequence: one token) cannot be split: the SP pass leaves that graph alone,
        while the runner's hand-off predicate, which takes every step at or above the SP
        threshold to be sequence-parallel, all-gathers a residual that is already full length,
        and the pipeline hand-off fails. Exposed by SP in a compiled mode with PP > 1 and a step
        whose real token count is not a multiple of ``tp`` (at tp2: a one-token step).""",
    ),
    _mutation(
        "all-gather-reversed-order", "class", True,
        "All-gather concatenates the ranks' shards in reversed rank order.",
        """All-gather must place rank ``r``'s shard at block ``r`` of the output. Concatenating
        in reversed order permutes the vocabulary of the gathered LM-head logits (greedy tokens
        change at once) and the token order of SP's gathered activations. Any run with
        ``tp > 1`` exposes it; with ``tp == 2`` it swaps the two halves.""",
    ),
    _mutation(
        "kv-heads-not-replicated", "class", True,
        "With fewer KV heads than TP ranks every rank keeps KV head 0.",
        """When ``num_kv_heads < tp`` each KV head must be replicated to the ranks whose query
        heads use it (rank ``r`` keeps head ``r * kv / tp``). Giving every rank the first KV head
        makes the query heads of the later ranks attend with the wrong keys and values. Exposed
        only by ``tp > num_kv_heads`` with more than one KV head (e.g. tiny-llama, 2 KV heads, at
        tp4); with one KV head the replicated head is head 0 anyway.""",
    ),
    _mutation(
        "vocab-shard-boundary-off-by-one", "class", True,
        "Vocab-parallel embedding treats the first id of every shard as outside it.",
        """Each rank of a vocab-parallel embedding owns ids ``[start, end)`` and contributes zeros
        for the rest before the all-reduce. Testing ``ids > start`` instead of ``ids >= start``
        leaves the first id of every shard (0, V / tp, ...) owned by nobody, so it embeds to a
        zero vector. Only prompts (or generated tokens) containing a shard's first id expose
        it, e.g. id 256 or 0 for a 512-token vocabulary at tp2; random ids rarely do.""",
    ),
    _mutation(
        "pp-layer-split-drops-layer", "class", True,
        "The pipeline layer split starts stage 1 one layer late, dropping a layer.",
        """Pipeline stages must hold contiguous, covering, non-overlapping layer ranges. Starting
        stage 1 one layer later than the previous stage ends drops that layer from the model
        (an off-by-one in the split arithmetic; the symmetric bug repeats one). The model still
        runs, with plausible but different outputs. Any PP > 1 run exposes it.""",
    ),
    _mutation(
        "decode-kv-slot-off-by-one", "class", False,
        "After a chunked prefill, decode steps write their KV one cache slot late.",
        """A decode step must write its key and value at the token's position and attend over
        positions ``[0, pos]``. If the decode's cache offset is one too large for sequences whose
        prompt was chunked (longer than the step budget), the KV goes one slot late and the
        attention reads one slot that was never written, while RoPE positions stay right. Only
        prompts longer than ``max_num_batched_tokens`` that then decode expose it; short prompts
        generate exactly as before.""",
    ),
    _mutation(
        "sp-norm-eps-hardcoded", "class", True,
        "The SP replacements run RMSNorm with a hard-coded epsilon of 1e-6.",
        """The sequence-parallel replacements must normalise with the epsilon the pattern matched
        (the model's ``rms_norm_eps``). A replacement that hard-codes 1e-6 changes every norm it
        rewrites, but the change is only visible when the epsilon is not negligible against the
        norm's input mean square: tiny-llava (epsilon 1e-2, residual mean square ~0.1, so every
        SP-rewritten norm moves by ~5%) under SP in a compiled mode. Models whose epsilon is
        1e-6 or 1e-5 cannot expose it, which is how such a bug survives.""",
    ),
    _mutation(
        "row-parallel-bias-per-rank", "class", True,
        "Row-parallel linear adds its bias on every rank before the all-reduce.",
        """A row-parallel layer's partial products are summed over the TP ranks; its bias must be
        added once, after the all-reduce. Adding it inside each rank's matmul sums it ``tp``
        times. Only models with row-parallel biases (o_proj or down_proj bias, e.g. tiny-llava's
        o_proj) at ``tp > 1`` expose it; bias-free models are unaffected.""",
    ),
    _mutation(
        "prompt-embeds-chunk-offset", "class", False,
        "A chunked prompt-embeds prompt takes every chunk's rows from the start of its embeddings.",
        """A prompt longer than the step budget is prefilled in chunks; a chunk starting at
        position ``p`` must take rows ``[p, p + n)`` of the request's prompt embeddings. Taking
        ``[0, n)`` for every chunk feeds the first chunk's embeddings again at later positions.
        The bug lives in the runner every setup shares, so every setup's baseline has it too
        and every engine-vs-engine comparison passes; only the one-device engine against Hugging
        Face transformers (the oracle case of every gate) shows it. Exposed by prompt-embeds
        and multimodal prompts longer than ``max_num_batched_tokens``.""",
        shared=True,
    ),
]

CATALOG: dict[str, Mutation] = {m.name: m for m in _MUTATIONS}


def get_mutation(name: str) -> Mutation:
    """The catalog entry ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return CATALOG[name]
    except KeyError:
        raise ValueError(f"unknown mutation {name!r}: choose from {', '.join(sorted(CATALOG))}") from None
