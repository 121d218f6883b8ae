"""Bad input to ``parity run``: every entry of the table exits 2 with one line naming the
problem, no traceback, and nothing written (docs/reliability.md lists them)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from parity.cli import main
from scenarios.models import checkpoint

MODEL = "tiny-llama"
BASE = ["run", "--backend", "mp", "--setups", "tp2-eager", "--scenarios", "text"]


def _ckpt(tmp: Path) -> Path:
    path = tmp / "ckpt"
    shutil.copytree(checkpoint(MODEL), path)
    return path


def _edit_config(tmp: Path, edit: Callable[[dict[str, object]], None]) -> Path:
    path = _ckpt(tmp)
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _edit_weights(tmp: Path, edit: Callable[[dict[str, object]], None]) -> Path:
    from safetensors.torch import load_file, save_file

    path = _ckpt(tmp)
    file = path / "model.safetensors"
    state = load_file(str(file))
    edit(state)  # type: ignore[arg-type]
    save_file(state, str(file))
    return path


def no_config(tmp: Path) -> Path:
    path = _ckpt(tmp)
    (path / "config.json").unlink()
    return path


def config_not_json(tmp: Path) -> Path:
    path = _ckpt(tmp)
    (path / "config.json").write_text("{\"architectures\": [\"LlamaForCausalLM\"")
    return path


def config_missing_field(tmp: Path) -> Path:
    return _edit_config(tmp, lambda cfg: cfg.pop("hidden_size"))


def unsupported_architecture(tmp: Path) -> Path:
    return _edit_config(tmp, lambda cfg: cfg.update(architectures=["GPT2LMHeadModel"]))


def shape_mismatch(tmp: Path) -> Path:
    return _edit_config(tmp, lambda cfg: cfg.update(intermediate_size=2 * int(cfg["intermediate_size"])))  # type: ignore[call-overload]


def no_weights(tmp: Path) -> Path:
    path = _ckpt(tmp)
    (path / "model.safetensors").unlink()
    return path


def corrupt_weights(tmp: Path) -> Path:
    path = _ckpt(tmp)
    (path / "model.safetensors").write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00not a header" + bytes(100))
    return path


def truncated_weights(tmp: Path) -> Path:
    path = _ckpt(tmp)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    return path


def missing_tensor(tmp: Path) -> Path:
    return _edit_weights(tmp, lambda state: state.pop("model.norm.weight"))


def wrong_tensor_shape(tmp: Path) -> Path:
    import torch

    return _edit_weights(tmp, lambda state: state.update({"model.norm.weight": torch.ones(3)}))


def a_file(tmp: Path) -> Path:
    path = tmp / "a-file"
    path.write_text("not a directory\n")
    return path


def other_run(tmp: Path) -> Path:
    """A run directory of another model (as a run records it before its first case)."""
    path = tmp / "other"
    path.mkdir()
    (path / "run.json").write_text(json.dumps({"model": "tiny-qwen2", "matrix": "smoke"}))
    (path / "results.jsonl").write_text("")
    return path


def empty_dir(tmp: Path) -> Path:
    path = tmp / "empty"
    path.mkdir()
    return path


def _requests(tmp: Path, entry: dict[str, object], **tensors: object) -> Path:
    """A requests file (scenarios.request_file) of one request, with its tensors in t.safetensors."""
    from safetensors.torch import save_file

    from scenarios.request_file import FORMAT

    if tensors:
        save_file(tensors, str(tmp / "t.safetensors"))  # type: ignore[arg-type]
    path = tmp / "reqs.json"
    path.write_text(json.dumps({"format": FORMAT, "requests": [entry]}))
    return path


def requests_not_json(tmp: Path) -> Path:
    path = tmp / "reqs.json"
    path.write_text('{"format": "parity-requests/1", "requests": [')
    return path


def requests_missing_field(tmp: Path) -> Path:
    return _requests(tmp, {"request_id": "a", "max_new_tokens": 4})


def requests_id_out_of_vocab(tmp: Path) -> Path:
    return _requests(tmp, {"request_id": "a", "prompt_ids": [1, 2, 512]})  # tiny-llama: 512 ids


def requests_embeds_wrong_shape(tmp: Path) -> Path:
    import torch

    return _requests(tmp, {"request_id": "a", "prompt_embeds": "t.safetensors#e"}, e=torch.zeros(4, 32))


def requests_embeds_wrong_dtype(tmp: Path) -> Path:
    import torch

    return _requests(tmp, {"request_id": "a", "prompt_embeds": "t.safetensors#e"},
                     e=torch.zeros(4, 64, dtype=torch.int32))


def requests_image_wrong_size(tmp: Path) -> Path:
    import torch

    # tiny-llava: 16 placeholders (id 500) per 3 x 32 x 32 image
    return _requests(tmp, {"request_id": "a", "prompt_ids": [1, *[500] * 16, 2], "images": ["t.safetensors#img"]},
                     img=torch.rand(3, 28, 28))


def requests_missing_tensor_file(tmp: Path) -> Path:
    return _requests(tmp, {"request_id": "a", "prompt_embeds": "embeds.safetensors"})


# (id, arguments after BASE with {ckpt}/{path} filled in, how the path is made, what the line says)
Make = Callable[[Path], Path] | None
CASES: list[tuple[str, list[str], Make, str]] = [
    ("unknown matrix", ["--matrix", "nope"], None, "unknown matrix 'nope'"),
    ("unknown setup", ["--setups", "tp2-fast"], None, "tp2-fast"),
    ("unknown scenario", ["--scenarios", "nope"], None, "nope"),
    ("unknown model", ["--model", "no-such-model"], None, "'no-such-model' is neither a built-in model"),
    ("unknown mutation", ["--mutation", "not-a-bug"], None, "not-a-bug"),
    ("unknown baseline", ["--baseline", "tp2-turbo"], None, "tp2-turbo"),
    ("confounded baseline", ["--setups", "tp2-sp-graph-full", "--baseline", "tp1-pp1-eager"], None, "differs in"),
    ("unknown case id", ["--cases", "tiny-llama/nope-text"], None, "--cases: tiny-llama/nope-text not in"),
    ("checkpoint without config.json", ["--model", "{path}"], no_config, "neither a built-in model"),
    ("config.json not JSON", ["--model", "{path}"], config_not_json, "config.json: not a readable JSON file"),
    ("config.json missing a field", ["--model", "{path}"], config_missing_field, "'hidden_size'"),
    ("unsupported architecture", ["--model", "{path}"], unsupported_architecture,
     "unsupported architecture 'GPT2LMHeadModel'"),
    ("shape not matching the config", ["--model", "{path}"], shape_mismatch, "the config implies"),
    ("no safetensors", ["--model", "{path}"], no_weights, "holds no *.safetensors weights"),
    ("corrupt safetensors", ["--model", "{path}"], corrupt_weights, "not a complete safetensors file"),
    ("truncated safetensors", ["--model", "{path}"], truncated_weights, "not a complete safetensors file"),
    ("missing tensor", ["--model", "{path}"], missing_tensor, "missing ['model.norm.weight']"),
    ("tensor of the wrong shape", ["--model", "{path}"], wrong_tensor_shape,
     "tensor model.norm.weight has shape [3] in the checkpoint"),
    ("case timeout zero", ["--case-timeout", "0"], None, "--case-timeout 0: must be a positive"),
    ("case timeout negative", ["--case-timeout", "-5"], None, "--case-timeout -5: must be a positive"),
    ("case timeout not a number", ["--case-timeout", "soon"], None, "invalid float value: 'soon'"),
    ("case timeout nan", ["--case-timeout", "nan"], None, "--case-timeout nan: must be a positive"),
    ("negative seed", ["--seed", "-1"], None, "--seed -1: must be >= 0"),
    ("seed not a number", ["--seed", "x"], None, "invalid int value: 'x'"),
    ("shard not I/N", ["--shard", "x"], None, "expected I/N"),
    ("shard index out of range", ["--shard", "2/2"], None, "need 0 <= I < N"),
    ("zero shards", ["--shard", "0/0"], None, "need 0 <= I < N"),
    ("unsupported dtype", ["--dtype", "float16"], None, "invalid choice: 'float16'"),
    ("unknown backend", ["--backend", "slurm"], None, "invalid choice: 'slurm'"),
    ("mutation with fresh workers", ["--mutation", "all-gather-reversed-order", "--fresh-workers"], None,
     "cannot be combined with --fresh-workers"),
    ("output under a file", ["--out", "{path}/out"], a_file, "is not a directory"),
    ("output is a file", ["--out", "{path}"], a_file, "exists and is not a directory"),
    ("resume a missing directory", ["--resume", "{tmp}/nowhere"], None, "no such directory"),
    ("resume a directory without a run", ["--resume", "{path}"], empty_dir, "holds no run to resume"),
    ("resume another model's run", ["--resume", "{path}"], other_run, "a different run (model"),
    ("requests file missing", ["--requests", "{tmp}/nowhere.json"], None, "nowhere.json: no such file"),
    ("requests file not JSON", ["--requests", "{path}"], requests_not_json, "reqs.json: not valid JSON"),
    ("request missing a field", ["--requests", "{path}"], requests_missing_field,
     "request 'a': missing field 'prompt_ids' or 'prompt_embeds'"),
    ("request id out of vocab", ["--requests", "{path}"], requests_id_out_of_vocab,
     "prompt_ids[2] = 512 is outside the model's vocabulary [0, 512)"),
    ("prompt-embeds of the wrong shape", ["--requests", "{path}"], requests_embeds_wrong_shape,
     "prompt_embeds t.safetensors#e has shape [4, 32]; the model needs [n, 64]"),
    ("prompt-embeds of the wrong dtype", ["--requests", "{path}"], requests_embeds_wrong_dtype,
     "has dtype int32; expected a floating dtype"),
    ("image of the wrong size", ["--model", "tiny-llava", "--requests", "{path}"], requests_image_wrong_size,
     "images[0] t.safetensors#img has shape [3, 28, 28]; the model's vision tower takes [channels, size, size] "
     "= [3, 32, 32]"),
    ("requests' tensor file missing", ["--requests", "{path}"], requests_missing_tensor_file,
     "prompt_embeds embeds.safetensors: no such file"),
    ("requests file name with a comma", ["--requests", "{tmp}/a,b.json"], None, "the file's name holds a comma"),
    ("file scenario without --requests", ["--scenarios", "file:mine"], None,
     "scenario 'file:mine' is a requests file's: give the file with --requests FILE"),
    ("repeat zero", ["--repeat", "0"], None, "--repeat 0: must be >= 1"),
    ("repeat not a number", ["--repeat", "twice"], None, "invalid int value: 'twice'"),
]


@pytest.mark.parametrize("args,make,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], make: Make, expected: str) -> None:
    path = make(tmp_path) if make else tmp_path / "unused"
    filled = [a.format(path=path, tmp=tmp_path) for a in args]
    out = tmp_path / "out"
    before = _snapshot(tmp_path)
    code = main([*BASE, "--model", MODEL, "--out", str(out), *filled])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    print(err)
    assert code == 2
    assert len(lines) == 1, lines
    assert "Traceback" not in err
    assert expected in lines[0]
    assert _snapshot(tmp_path) == before  # nothing written, nothing created


def test_the_table_is_at_least_twenty_inputs() -> None:
    assert len(CASES) >= 20


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}
