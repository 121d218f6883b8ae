"""Reject a parallel layout the model cannot take, before any process starts."""

from __future__ import annotations

from reference_impl.config import ModelConfig


def validate_parallel(cfg: ModelConfig, tp: int, pp: int, device: str = "cpu",
                      num_devices: int | None = None) -> None:
    """Raise ``ValueError`` naming the numbers that do not fit."""
    text = cfg.text
    if tp < 1 or pp < 1:
        raise ValueError(f"tp={tp} and pp={pp} must be >= 1")
    checks = [
        (text.num_heads % tp == 0, f"tp={tp} does not divide num_attention_heads={text.num_heads}"),
        (text.num_kv_heads % tp == 0 or tp % text.num_kv_heads == 0,
         f"tp={tp} and num_key_value_heads={text.num_kv_heads}: neither divides the other"),
        (text.intermediate_size % tp == 0,
         f"tp={tp} does not divide intermediate_size={text.intermediate_size}"),
        (text.vocab_size % tp == 0, f"tp={tp} does not divide vocab_size={text.vocab_size}"),
        (pp <= text.num_layers, f"pp={pp} is larger than the number of layers ({text.num_layers})"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if device == "cuda":
        if num_devices is None:
            import torch

            num_devices = torch.cuda.device_count()
        if tp * pp > num_devices:
            raise ValueError(
                f"tp={tp} x pp={pp} = {tp * pp} ranks need {tp * pp} CUDA devices; {num_devices} available"
            )
