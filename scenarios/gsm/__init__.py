"""Grade-school arithmetic word problems in gsm8k's format, the tiny Llama trained on them
(``gsm-llama``), and the offline lm-eval task over the shipped splits."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data"          # train.jsonl, test.jsonl (python -m scenarios.gsm.problems)
CHECKPOINT = ROOT / "checkpoint"  # the trained model (python -m scenarios.gsm.train)
TASKS = ROOT / "tasks"        # lm-eval task yamls: pass as --include_path
