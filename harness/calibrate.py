"""Measure the clean noise every tolerance of ``harness.compare`` must stay above.

``python -m harness.calibrate [--matrix smoke] [--dtype float32|bfloat16] [--seeds 0,1,2]
[--backend ray|mp] [--model NAME] [--out FILE.json]`` runs each case's baseline, then the
candidate forced along the baseline's tokens (``Request.forced_tokens``), so that every step of
every request is compared on the same prefix, and reports per kind of pair (SP vs SP off, a
parallel setup vs one device, the engine vs transformers) the largest chosen-token |Δ logprob|,
the largest |Δ logprob| of a top-k id both sides list, and the flips: steps where the
candidate's own greedy token differs from the baseline's, with how far each side's token led.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from harness.case import Case
from harness.compare import flip_gaps, forced_greedy
from harness.matrix import get_matrix
from harness.orchestrate import Orchestrator
from harness.outcome import policy_for
from harness.plan import RunOptions, plan
from reference_impl.requests import RequestOutput


@dataclass
class Noise:
    """The largest clean differences seen for one kind of pair."""

    cases: int = 0
    steps: int = 0
    max_chosen: float = 0.0
    max_topk: float = 0.0
    flips: int = 0
    max_flip_gap: float = 0.0  # the larger of the two sides' leads, over all flips
    max_flips_per_request: int = 0
    worst: dict[str, str] = field(default_factory=dict)  # measure -> the case that set it

    def add(self, case_id: str, cand: RequestOutput, base: RequestOutput) -> None:
        flips = self.flips
        for step, token in enumerate(base.token_ids):
            self.steps += 1
            c_top, b_top = dict(cand.top_logprobs[step]), dict(base.top_logprobs[step])
            self._max("max_chosen", abs(cand.logprobs[step] - base.logprobs[step]), case_id)
            shared = [abs(c_top[t] - b_top[t]) for t in set(c_top) & set(b_top)]
            self._max("max_topk", max(shared, default=0.0), case_id)
            greedy = forced_greedy(cand, step)  # a tie with the forced token is no flip
            if greedy != token:
                self.flips += 1
                gaps = flip_gaps(cand, base, step, greedy)  # None: not in that side's top-k
                self._max("max_flip_gap", max(math.inf if g is None else g for g in gaps), case_id)
        if self.flips - flips > self.max_flips_per_request:
            self.max_flips_per_request = self.flips - flips
            self.worst["max_flips_per_request"] = f"{case_id} {base.request_id}"

    def _max(self, name: str, value: float, case_id: str) -> None:
        if value > getattr(self, name):
            setattr(self, name, value)
            self.worst[name] = case_id


def pair_kind(case: Case) -> str:
    """``identical-pair`` (the ``identical`` policy's pairs), ``oracle`` or ``parallel``."""
    if case.baseline_id == "hf":
        return "oracle"
    return "identical-pair" if policy_for(case, "auto") == "identical" else "parallel"


def measure(options: RunOptions, seeds: Sequence[int], setups: Sequence[str] | None = None,
            matrix: str = "smoke") -> dict[str, Noise]:
    """The clean noise per kind of pair over ``seeds``."""
    noise: dict[str, Noise] = {}
    for seed in seeds:
        seeded = replace(options, seed=seed)
        orchestrator = Orchestrator(seeded)
        try:
            for planned in plan(get_matrix(matrix), seeded, setups):
                if planned.skip_reason:
                    continue
                case = planned.case
                requests = orchestrator.requests(case.scenario)
                base = orchestrator.baseline_outputs(case, requests)
                forced = orchestrator.forced_replay(case, requests, base)
                kind = noise.setdefault(pair_kind(case), Noise())
                kind.cases += 1
                for b in base:
                    kind.add(f"{case.id} seed {seed}", forced[b.request_id], b)
                print(f"{case.id} seed {seed}: {asdict(kind)}", file=sys.stderr)
        finally:
            orchestrator.close()
    return noise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", default="smoke")
    parser.add_argument("--setups", help="comma-separated subset of the matrix's setups")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--backend", default="ray", choices=["ray", "mp"])
    parser.add_argument("--model", help="default: the matrix's (tiny-llava; smollm2-135m for real)")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.model = args.model or get_matrix(args.matrix).model
    options = RunOptions(backend=args.backend, device=args.device, dtype=args.dtype, model=args.model)
    seeds = [int(s) for s in args.seeds.split(",")]
    setups = args.setups.split(",") if args.setups else None
    noise = measure(options, seeds, setups, args.matrix)
    figures = {kind: asdict(n) for kind, n in noise.items()}
    text = json.dumps({"matrix": args.matrix, "dtype": args.dtype, "device": args.device, "seeds": seeds,
                       "model": args.model, "noise": figures}, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
