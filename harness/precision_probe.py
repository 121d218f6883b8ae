"""Which reduced-precision path is closer to float32: eager or a compiled one?

When a compiled setup and eager disagree in bfloat16, this tells compiler numerics from a compiler
bug. It runs one scenario on one device under float32 eager (the reference), bfloat16 eager,
bfloat16 compiled and float32 compiled, greedy and free-running, and prints for each the largest
chosen-token |Δ logprob| against the reference over the steps whose tokens still agree with it, and
where each request's tokens part from it. A bug shows as a float32 compiled run that differs from
float32 eager; numerics as a float32 compiled run that matches, with the bfloat16 runs about
equally far from the reference.

    python -m harness.precision_probe --device cuda --scenario prompt_embeds --compile inductor-full
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from harness.compare import compare
from harness.launch.inprocess import InProcessLauncher
from harness.setup import ParallelSetup
from reference_impl.requests import RequestOutput
from scenarios.models import resolve
from scenarios.registry import SCENARIOS, get_scenario


@dataclass(frozen=True)
class Distance:
    """One run against the reference."""

    label: str
    max_logprob_diff: float  # over the steps whose tokens agree with the reference
    steps_compared: int
    parted: dict[str, int]  # request id -> first step whose token differs from the reference


def distance(label: str, outputs: list[RequestOutput], reference: list[RequestOutput]) -> Distance:
    """The comparator's own step walk (``exact``: each request up to its first differing token),
    read for distances rather than judged against a tolerance."""
    verdict = compare(outputs, reference, policy="exact")
    parted = {d.request_id: d.step for d in verdict.divergences if d.reason != "logprob"}
    return Distance(label, float(verdict.metrics["max_logprob_diff"]), int(verdict.metrics["steps_compared"]),
                    parted)


def probe(device: str, scenario: str, compiled: str, model: str = "tiny-llava") -> list[Distance]:
    checkpoint = resolve(model)
    launcher = InProcessLauncher(device)
    runs: dict[str, list[RequestOutput]] = {}
    try:
        for dtype, setup_id in [("float32", "tp1-pp1-eager"), ("bfloat16", "tp1-pp1-eager"),
                                ("bfloat16", f"tp1-pp1-{compiled}"), ("float32", f"tp1-pp1-{compiled}")]:
            setup = ParallelSetup.parse(setup_id, dtype, device)
            requests = get_scenario(scenario).requests(checkpoint, dtype)
            runs[f"{setup_id} {dtype}"] = launcher.run(setup.engine_spec(str(checkpoint)), requests)
    finally:
        launcher.close()
    reference = runs["tp1-pp1-eager float32"]
    return [distance(label, outs, reference) for label, outs in runs.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.precision_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--scenario", default="prompt_embeds", choices=sorted(SCENARIOS))
    parser.add_argument("--compile", default="inductor-full", help="compile mode and partition, e.g. graph-piecewise")
    parser.add_argument("--model", default="tiny-llava")
    args = parser.parse_args(argv)
    print(f"{args.scenario} on {args.device}: against tp1-pp1-eager float32")
    for d in probe(args.device, args.scenario, args.compile, args.model):
        print(f"  {d.label:36s} max |Δ logprob| {d.max_logprob_diff:.3g}; {d.steps_compared} steps compared; "
              f"tokens part: {d.parted or 'never'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
