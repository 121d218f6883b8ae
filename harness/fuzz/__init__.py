"""``parity fuzz``: differential testing over random architectures, inputs and engine configs.

Each example is data (``example.Example``): a tiny model's shape, an engine's batching limits, a
request mix and the setups that fit. ``strategies`` draws them with Hypothesis; ``run`` builds the
checkpoint, runs every drawn setup against its automatic baseline and the one-device engine
against Hugging Face transformers, shrinks a failure to a smallest example and writes a
reproducer (``repro``) whose ``parity run`` command fails again.
"""
