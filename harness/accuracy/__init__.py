"""Task accuracy through lm-eval on any setup: the ``parity`` lm-eval model (``lm``), the paired
test (``paired``) and ``parity accuracy`` (``run``)."""
