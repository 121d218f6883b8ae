"""Requests from a file: the scenario of ``parity run --requests FILE``, and the writer that saves
a list of requests in the same format (the fuzzer's reproducers, a user's own inputs).

The format (docs/requests.md), a UTF-8 JSON document::

    {
      "format": "parity-requests/1",
      "requests": [
        {"request_id": "greeting", "prompt_ids": [1, 15, 27, 9], "max_new_tokens": 8, "top_k": 5},
        {"request_id": "embedded", "prompt_embeds": "tensors.safetensors#embedded.prompt_embeds"},
        {"request_id": "picture", "prompt_ids": [3, 500, 500, …, 7], "images": ["cat.safetensors"]}
      ]
    }

Each request has a ``request_id`` (unique, non-empty) and exactly one of ``prompt_ids`` (token ids)
and ``prompt_embeds`` (a tensor ``[n, hidden]`` of a floating dtype, cast to the run's dtype);
``images`` (LLaVA models: ``[channels, size, size]`` floating tensors, one per run of placeholder
tokens in ``prompt_ids``), ``max_new_tokens`` (default 16) and ``top_k`` (default 5) are optional.
A tensor is named as ``FILE#NAME`` (the tensor ``NAME`` in the safetensors file ``FILE``) or
``FILE`` (a file that holds exactly one tensor); ``FILE`` is relative to the JSON file's directory.
Tensors are read through safetensors only (nothing is unpickled). Every request is checked against
the model's config before anything runs; each problem is one line of the ``RequestFileError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reference_impl.config import ModelConfig
from reference_impl.requests import Request, validate_request

FORMAT = "parity-requests/1"
SCENARIO_PREFIX = "file:"
REQUEST_KEYS = ("request_id", "prompt_ids", "prompt_embeds", "images", "max_new_tokens", "top_k")
# The defaults of a request's optional fields: the built-in scenarios' (scenarios.inputs.InputSpec).
DEFAULT_MAX_NEW_TOKENS = 16
DEFAULT_TOP_K = 5
# Problems listed in one error; a file with more says how many it left out.
MAX_PROBLEMS = 20


class RequestFileError(ValueError):
    """An invalid requests file: one line per problem, each naming the file and the request."""

    def __init__(self, path: Path, problems: Sequence[str]) -> None:
        self.path, self.problems = path, list(problems)
        shown = self.problems[:MAX_PROBLEMS]
        if len(self.problems) > MAX_PROBLEMS:
            shown.append(f"… and {len(self.problems) - MAX_PROBLEMS} more problems")
        super().__init__("\n".join(f"--requests {path}: {p}" for p in shown))


def scenario_name(path: str | Path) -> str:
    """The scenario of a requests file: ``file:<stem>`` (``file:bug42`` for ``repro/bug42.json``)."""
    return SCENARIO_PREFIX + Path(path).stem


# --- reading -----------------------------------------------------------------------------------


@dataclass
class _Reader:
    """Reads one file's requests, collecting every problem instead of stopping at the first."""

    path: Path
    cfg: ModelConfig
    dtype: torch.dtype
    problems: list[str] = field(default_factory=list)
    _tensor_files: dict[Path, dict[str, torch.Tensor] | str] = field(default_factory=dict)

    def problem(self, where: str, text: str) -> None:
        self.problems.append(f"{where}: {text}" if where else text)

    def document(self) -> list[Any]:
        """The JSON document's ``requests`` list (empty after a problem with the document)."""
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.problem("", "no such file")
            return []
        except (OSError, UnicodeDecodeError) as exc:
            self.problem("", f"cannot be read: {exc}")
            return []
        except json.JSONDecodeError as exc:
            self.problem("", f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")
            return []
        if not isinstance(doc, dict):
            self.problem("", f'expected a JSON object {{"format": "{FORMAT}", "requests": [...]}}, '
                             f"found {type(doc).__name__}")
            return []
        if doc.get("format") != FORMAT:
            self.problem("", f'"format" is {json.dumps(doc.get("format"))}; expected "{FORMAT}"')
        unknown = sorted(set(doc) - {"format", "requests"})
        if unknown:
            self.problem("", f"unknown keys {unknown}: the document holds only \"format\" and \"requests\"")
        requests = doc.get("requests")
        if not isinstance(requests, list) or not requests:
            self.problem("", '"requests" must be a non-empty list of request objects')
            return []
        return requests

    def requests(self) -> list[Request]:
        out: list[Request] = []
        seen: set[str] = set()
        for i, entry in enumerate(self.document()):
            req = self.request(i, entry)
            if req is None:
                continue
            if req.request_id in seen:
                self.problem(f"request {req.request_id!r}", "request_id used twice; ids must be unique")
                continue
            seen.add(req.request_id)
            out.append(req)
        return out

    def request(self, i: int, entry: Any) -> Request | None:
        where = f"requests[{i}]"
        if not isinstance(entry, dict):
            self.problem(where, f"expected a request object, found {type(entry).__name__}")
            return None
        before = len(self.problems)
        rid = entry.get("request_id")
        if not isinstance(rid, str) or not rid:
            self.problem(where, "missing field 'request_id' (a non-empty string)")
            return None
        where = f"request {rid!r}"
        unknown = sorted(set(entry) - set(REQUEST_KEYS))
        if unknown:
            self.problem(where, f"unknown fields {unknown}; a request has {list(REQUEST_KEYS)}")
        max_new = self.count(where, entry, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS, 1, None)
        top_k = self.count(where, entry, "top_k", DEFAULT_TOP_K, 1, self.cfg.text.vocab_size)
        has_ids, has_embeds = "prompt_ids" in entry, "prompt_embeds" in entry
        if has_ids == has_embeds:
            self.problem(where, "give exactly one of 'prompt_ids' and 'prompt_embeds'"
                         if has_ids else "missing field 'prompt_ids' or 'prompt_embeds'")
            return None
        ids = self.prompt_ids(where, entry["prompt_ids"]) if has_ids else None
        embeds = self.prompt_embeds(where, entry["prompt_embeds"]) if has_embeds else None
        images = self.images(where, entry.get("images", []), ids)
        if len(self.problems) > before or (ids is None and embeds is None):
            return None
        req = Request(rid, prompt_ids=ids, prompt_embeds=embeds, images=images,
                      max_new_tokens=max_new, top_k=top_k)
        self.fits(where, req)
        if len(self.problems) > before:
            return None
        try:  # the engine's own checks (reference_impl.requests): the ones above leave none of them
            validate_request(req, self.cfg, self.cfg.text.max_position_embeddings, self.dtype)
        except ValueError as exc:
            self.problem(where, str(exc).removeprefix(f"request {rid}: "))
            return None
        return req

    def count(self, where: str, entry: dict[str, Any], key: str, default: int, low: int, high: int | None) -> int:
        value = entry.get(key, default)
        if not _is_int(value) or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            self.problem(where, f"{key} {json.dumps(value)}: must be an integer {bound}")
            return default
        return int(value)

    def fits(self, where: str, req: Request) -> None:
        """Prompt plus generated tokens within the model's context."""
        limit = self.cfg.text.max_position_embeddings
        if req.prompt_len + req.max_new_tokens > limit:
            self.problem(where, f"{req.prompt_len} prompt tokens + max_new_tokens {req.max_new_tokens} exceed "
                                f"the model's context of {limit} (max_position_embeddings)")

    def prompt_ids(self, where: str, value: Any) -> tuple[int, ...] | None:
        vocab = self.cfg.text.vocab_size
        if not isinstance(value, list) or not value:
            self.problem(where, "prompt_ids must be a non-empty list of token ids")
            return None
        bad = next((t for t in value if not _is_int(t)), None)
        if bad is not None:
            self.problem(where, f"prompt_ids holds {json.dumps(bad)}, not an integer token id")
            return None
        outside = [(pos, t) for pos, t in enumerate(value) if not 0 <= t < vocab]
        if outside:
            pos, t = outside[0]
            more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
            self.problem(where, f"prompt_ids[{pos}] = {t} is outside the model's vocabulary [0, {vocab}){more}")
            return None
        return tuple(int(t) for t in value)

    def prompt_embeds(self, where: str, ref: Any) -> torch.Tensor | None:
        hidden = self.cfg.text.hidden_size
        t = self.tensor(where, "prompt_embeds", ref)
        if t is None:
            return None
        if t.dim() != 2 or t.shape[1] != hidden or t.shape[0] < 1:
            self.problem(where, f"prompt_embeds {ref} has shape {list(t.shape)}; the model needs [n, {hidden}] "
                                f"(n >= 1 positions of hidden_size {hidden})")
            return None
        if not self.floating(where, "prompt_embeds", ref, t):
            return None
        return t.to(self.dtype)

    def images(self, where: str, refs: Any, ids: tuple[int, ...] | None) -> tuple[torch.Tensor, ...]:
        if not isinstance(refs, list):
            self.problem(where, "images must be a list of tensor names")
            return ()
        mm = self.cfg.multimodal
        if mm is None:
            if refs:
                self.problem(where, f"images given, but {self.cfg.architecture} takes no images")
            return ()
        v = mm.vision
        want = [v.num_channels, v.image_size, v.image_size]
        images = []
        for j, ref in enumerate(refs):
            t = self.tensor(where, f"images[{j}]", ref)
            if t is None:
                continue
            if list(t.shape) != want:
                self.problem(where, f"images[{j}] {ref} has shape {list(t.shape)}; the model's vision tower "
                                    f"takes [channels, size, size] = {want}")
            elif self.floating(where, f"images[{j}]", ref, t):
                images.append(t.float())
        if ids is None:
            if refs:
                self.problem(where, "images need prompt_ids with image placeholder tokens, not prompt_embeds")
            return tuple(images)
        self.placeholders(where, ids, len(refs), mm.image_token_id, mm.tokens_per_image)
        return tuple(images)

    def placeholders(self, where: str, ids: tuple[int, ...], n_images: int, token: int, per_image: int) -> None:
        """``per_image`` placeholder ids per image, in runs that each hold whole images."""
        runs, run = [], 0
        for t in (*ids, None):
            if t == token:
                run += 1
            elif run:
                runs.append(run)
                run = 0
        if n_images == 0 and runs:
            self.problem(where, f"{sum(runs)} image placeholder tokens (id {token}) in prompt_ids but no images")
        elif sum(runs) != n_images * per_image:
            self.problem(where, f"{sum(runs)} image placeholder tokens (id {token}) in prompt_ids for {n_images} "
                                f"images; the model needs {per_image} per image ({n_images * per_image})")
        elif any(r % per_image for r in runs):
            self.problem(where, f"image placeholder runs of {runs} tokens (id {token}): each run must hold whole "
                                f"images of {per_image} placeholders")

    def floating(self, where: str, what: str, ref: str, t: torch.Tensor) -> bool:
        if not t.is_floating_point():
            self.problem(where, f"{what} {ref} has dtype {str(t.dtype).removeprefix('torch.')}; "
                                "expected a floating dtype (float32, bfloat16, float16, float64)")
            return False
        if not bool(torch.isfinite(t).all()):
            self.problem(where, f"{what} {ref} holds NaN or Inf")
            return False
        return True

    def tensor(self, where: str, what: str, ref: Any) -> torch.Tensor | None:
        """The tensor named by ``ref`` (``FILE#NAME`` or ``FILE``), or None after a problem."""
        if not isinstance(ref, str) or not ref or ref.startswith("#"):
            self.problem(where, f"{what} must name a tensor as \"FILE.safetensors#NAME\" or \"FILE.safetensors\", "
                                f"found {json.dumps(ref)}")
            return None
        file_text, _, name = ref.partition("#")
        tensors = self.tensor_file(self.path.parent / file_text)
        if isinstance(tensors, str):
            self.problem(where, f"{what} {ref}: {tensors}")
            return None
        if not name:
            if len(tensors) != 1:
                self.problem(where, f"{what} {ref}: the file holds {len(tensors)} tensors; name one as "
                                    f"{file_text}#NAME ({_names(tensors)})")
                return None
            return next(iter(tensors.values()))
        if name not in tensors:
            self.problem(where, f"{what} {ref}: {file_text} holds no tensor {name!r} ({_names(tensors)})")
            return None
        return tensors[name]

    def tensor_file(self, path: Path) -> dict[str, torch.Tensor] | str:
        """A safetensors file's tensors, or why it cannot be read (read once per file)."""
        key = path.resolve()
        if key not in self._tensor_files:
            self._tensor_files[key] = _load_safetensors(path)
        return self._tensor_files[key]


def _load_safetensors(path: Path) -> dict[str, torch.Tensor] | str:
    from safetensors.torch import load_file

    if not path.is_file():
        return f"no such file ({path})" if not path.exists() else f"not a file ({path})"
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError (a corrupt header), and OSError
        return f"not a complete safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"


def _names(tensors: dict[str, torch.Tensor]) -> str:
    names = sorted(tensors)
    shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
    return f"it holds: {shown}" if names else "it holds none"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_requests(path: str | Path, cfg: ModelConfig, dtype: torch.dtype) -> list[Request]:
    """The requests of the file at ``path``, checked against ``cfg``; prompt-embeds in ``dtype``.

    Raises ``RequestFileError`` listing every problem found (one line each)."""
    reader = _Reader(Path(path), cfg, dtype)
    requests = reader.requests()
    if reader.problems:
        raise RequestFileError(Path(path), reader.problems)
    return requests


def file_digest(path: str | Path) -> str:
    """A hash of the file and of every tensor file it names (what a resumed run must find again)."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256(path.read_bytes())
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        doc = {}
    files = sorted({ref.partition("#")[0] for r in doc.get("requests", []) if isinstance(r, dict)
                    for ref in [r.get("prompt_embeds"), *(r.get("images") or [])] if isinstance(ref, str)})
    for name in files:
        tensor_file = path.parent / name
        h.update(name.encode() + (tensor_file.read_bytes() if tensor_file.is_file() else b"<missing>"))
    return h.hexdigest()[:16]


# --- writing -----------------------------------------------------------------------------------


def save_requests(path: str | Path, requests: Sequence[Request]) -> Path:
    """Write ``requests`` to ``path`` (JSON) and their tensors, if any, to ``<stem>.safetensors``
    beside it (tensors ``r<i>.prompt_embeds`` and ``r<i>.image<j>``, ``i`` the request's index).
    ``load_requests`` gives them back bit for bit (prompt-embeds in the dtype loaded with). Both
    files are replaced atomically. Raises ``ValueError`` for what the format cannot hold (forced
    tokens, prompt logprobs, stop tokens) and for repeated request ids."""
    from safetensors.torch import save_file

    path = Path(path)
    ids = [r.request_id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("save_requests: request ids must be unique")
    tensor_file = path.with_name(path.stem + ".safetensors")
    tensors: dict[str, torch.Tensor] = {}
    entries = [_entry(i, r, tensor_file.name, tensors) for i, r in enumerate(requests)]
    path.parent.mkdir(parents=True, exist_ok=True)
    if tensors:
        _atomic(tensor_file, lambda tmp: save_file(tensors, str(tmp)))
    doc = {"format": FORMAT, "requests": entries}
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8"))
    return path


def _entry(i: int, r: Request, tensor_file: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    unsupported = [name for name, value in (("forced_tokens", r.forced_tokens), ("prompt_logprobs", r.prompt_logprobs),
                                            ("score_ids", r.score_ids), ("stop_token_ids", r.stop_token_ids)) if value]
    if unsupported:
        raise ValueError(f"save_requests: request {r.request_id!r} uses {unsupported}, which a requests file "
                         "does not hold")
    entry: dict[str, Any] = {"request_id": r.request_id}
    if r.prompt_embeds is not None:
        name = f"r{i}.prompt_embeds"
        tensors[name] = r.prompt_embeds.detach().cpu().contiguous()
        entry["prompt_embeds"] = f"{tensor_file}#{name}"
    else:
        entry["prompt_ids"] = list(r.prompt_ids or ())
    if r.images:
        entry["images"] = []
        for j, image in enumerate(r.images):
            name = f"r{i}.image{j}"
            tensors[name] = image.detach().cpu().contiguous()
            entry["images"].append(f"{tensor_file}#{name}")
    entry["max_new_tokens"], entry["top_k"] = r.max_new_tokens, r.top_k
    return entry


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
