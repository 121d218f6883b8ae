"""The ``parity`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    """Build a tiny checkpoint offline, load it into the engine, and generate greedily."""
    import torch

    from reference_impl.loader import load_model
    from reference_impl.requests import Request
    from reference_impl.runner import EngineConfig, Runner
    from scenarios.models import resolve

    torch.set_num_threads(1)
    start = time.perf_counter()
    path = resolve(args.model)
    model = load_model(path)
    print(f"model {args.model}: {path}")
    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.text.vocab_size
    requests = [
        Request(f"req{i}", tuple(torch.randint(0, vocab - 16, (n,), generator=gen).tolist()),
                max_new_tokens=args.max_new_tokens)
        for i, n in enumerate((5, 17, 40))
    ]
    outputs = Runner(model, EngineConfig(max_num_batched_tokens=32)).generate(requests)
    for req, out in zip(requests, outputs):
        mean_lp = sum(out.logprobs) / len(out.logprobs)
        print(f"{out.request_id}: prompt {req.prompt_len} tokens -> {out.token_ids} "
              f"(mean logprob {mean_lp:.3f})")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


def _list(args: argparse.Namespace) -> int:
    from scenarios.models import MODELS

    if args.what == "models":
        for name, spec in MODELS.items():
            print(f"{name:12s} {spec.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parity", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a tiny model and generate with the engine")
    demo.add_argument("--model", default="tiny-llama", help="built-in model name or checkpoint dir")
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.set_defaults(func=_demo)
    lst = sub.add_parser("list", help="list built-in things")
    lst.add_argument("what", choices=["models"])
    lst.set_defaults(func=_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ValueError as exc:
        print(f"parity: error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
