"""The ``gsm-llama`` tokenizer, made with the ``tokenizers`` library.

Byte-level BPE (lossless: decoding gives back the exact text, which the answer regexes need),
digits split one per token so the model does arithmetic digit by digit, and ``Question:`` as one
added token: it opens every few-shot example, so a stop on it (lm-eval's ``until``) can end a
generation on that token rather than only after decoding.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 512
EOS = "<|endoftext|>"
QUESTION = "Question:"


def train_tokenizer(texts: Iterable[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([QUESTION])
    return tok


def save_hf(tok: Tokenizer, out: Path, model_max_length: int) -> None:
    """``tokenizer.json`` plus the config transformers needs to load it as a fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token=EOS, model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out))
