"""Tests for moas.text: encoder chain, shapes/masks, tag encodings and the hash fallback."""

from __future__ import annotations

import logging
import math
import socket

import pytest
import torch

from moas.errors import TextEncoderError
from moas.text.encoder import BUNDLED_ID, HASH_ID, TextEncoder, split_tags
from moas.text.hashing import _create_hash_embedding, _hash_bits

MISSING_MODEL = "sentence-transformers/moas-test-model-that-does-not-exist"
PROMPTS = [
    "1girl, solo, long hair, blue eyes, school uniform, cherry blossoms, outdoors",
    "a cat",
    "",
    "landscape, night sky",
]


@pytest.fixture(scope="module")
def st_encoder() -> TextEncoder:
    """The bundled MiniLM, loaded once with the network made unreachable."""
    attempts: list[object] = []

    def no_network(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network disabled in tests")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", no_network)
        enc = TextEncoder(model_name=MISSING_MODEL)
    assert attempts == [], f"text encoder tried the network: {attempts}"
    return enc


@pytest.fixture(scope="module")
def hash_encoder() -> TextEncoder:
    return TextEncoder(model_name=None, allow_bundled=False)


# ---- chain ------------------------------------------------------------------------------------


def test_bundled_minilm_used_when_configured_model_absent(st_encoder: TextEncoder) -> None:
    assert st_encoder.encoder_id == BUNDLED_ID
    assert st_encoder.dim == 768


def test_chain_logs_choice_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="moas.text.encoder"):
        enc = TextEncoder(model_name=MISSING_MODEL)  # models are cached per process: cheap
    assert enc.encoder_id == BUNDLED_ID
    text = caplog.text
    assert "st:moas-test-model-that-does-not-exist is not available locally" in text
    assert f"using {BUNDLED_ID}" in text
    assert "Traceback" not in text


def test_hash_used_when_models_disallowed(hash_encoder: TextEncoder) -> None:
    assert hash_encoder.encoder_id == HASH_ID


def test_no_encoder_at_all_raises() -> None:
    with pytest.raises(TextEncoderError):
        TextEncoder(model_name=MISSING_MODEL, allow_bundled=False, allow_hash=False)


def test_require_id_loads_exact_encoder(st_encoder: TextEncoder) -> None:
    assert TextEncoder(model_name=None, require_id=BUNDLED_ID).encoder_id == BUNDLED_ID
    # require_id wins over the allow_* flags and the configured model.
    assert TextEncoder(require_id=HASH_ID).encoder_id == HASH_ID


def test_require_id_mismatch_raises_naming_both() -> None:
    with pytest.raises(TextEncoderError) as info:
        TextEncoder(model_name=None, allow_bundled=False, require_id="st:not-a-real-encoder-xyz")
    msg = str(info.value)
    assert "st:not-a-real-encoder-xyz" in msg
    assert HASH_ID in msg  # the encoder that is available here
    with pytest.raises(TextEncoderError):
        TextEncoder(require_id="clip:unknown-family")


# ---- model encodings --------------------------------------------------------------------------


def test_shapes_and_masks(st_encoder: TextEncoder) -> None:
    enc = st_encoder.encode(PROMPTS)
    b = len(PROMPTS)
    assert enc.pooled.shape == (b, 768) and enc.pooled.dtype == torch.float32
    assert enc.tokens.dim() == 3 and enc.tokens.shape[0] == b and enc.tokens.shape[2] == 768
    assert enc.mask.shape == enc.tokens.shape[:2] and enc.mask.dtype == torch.bool
    assert enc.tags.shape == (b, 7, 768)
    assert enc.tag_mask.dtype == torch.bool
    assert enc.tag_mask.sum(1).tolist() == [7, 1, 1, 2]
    lengths = enc.mask.sum(1).tolist()
    # Longest prompt defines L; masks are left-aligned; the CLS/SEP tokens are included.
    assert lengths[0] == enc.tokens.shape[1] and lengths[1] == 4  # [CLS] a cat [SEP]
    for row, n in zip(enc.mask, lengths, strict=True):
        assert row[:n].all() and not row[n:].any()
    assert enc.tokens[~enc.mask].abs().sum() == 0
    assert enc.tags[~enc.tag_mask].abs().sum() == 0
    assert enc.pooled.device.type == "cpu"


def test_pooled_is_duplicated_minilm_sentence_embedding(st_encoder: TextEncoder) -> None:
    enc = st_encoder.encode(["1girl, solo", "a cat"])
    a, b = enc.pooled[:, :384], enc.pooled[:, 384:]
    assert torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-4)  # all-MiniLM-L6-v2 normalises
    assert torch.equal(enc.tokens[..., :384], enc.tokens[..., 384:])
    assert torch.equal(enc.tags[..., :384], enc.tags[..., 384:])


def test_deterministic_and_batch_independent(st_encoder: TextEncoder) -> None:
    first = st_encoder.encode(PROMPTS)
    again = st_encoder.encode(PROMPTS)
    assert torch.equal(first.pooled, again.pooled)
    assert torch.equal(first.tags, again.tags)
    alone = st_encoder.encode([PROMPTS[1]])
    assert torch.allclose(alone.pooled[0], first.pooled[1], atol=1e-5)


def test_tags_are_order_invariant(st_encoder: TextEncoder) -> None:
    enc = st_encoder.encode(["1girl, blue eyes, smile", "Smile ,1girl,  blue eyes"])
    a = {tuple(v.tolist()) for v in enc.tags[0][enc.tag_mask[0]]}
    b = {tuple(v.tolist()) for v in enc.tags[1][enc.tag_mask[1]]}
    assert len(a) == 3 and a == b
    # Each tag is a sentence of its own: equal to encoding that tag as a whole prompt.
    single = st_encoder.encode(["smile"])
    assert torch.allclose(enc.tags[0, 2], single.pooled[0], atol=1e-5)


def test_semantics_are_meaningful(st_encoder: TextEncoder) -> None:
    p = st_encoder.encode(["a photo of a cat", "a picture of a kitten", "stock market report"]).pooled
    cos = torch.nn.functional.cosine_similarity
    assert cos(p[0], p[1], dim=0) > cos(p[0], p[2], dim=0) + 0.2


def test_max_tokens_truncates() -> None:
    enc = TextEncoder(model_name=None, max_tokens=5).encode([" ".join(["word"] * 40)])
    assert enc.tokens.shape[1] == 5 and enc.mask.all()


def test_empty_prompt_is_the_zero_null_encoding(st_encoder: TextEncoder, hash_encoder: TextEncoder) -> None:
    for encoder in (st_encoder, hash_encoder):
        enc = encoder.encode(["", "   "])
        assert enc.pooled.abs().sum() == 0 and enc.tokens.abs().sum() == 0 and enc.tags.abs().sum() == 0
        assert enc.mask.tolist() == [[True], [True]] and enc.tag_mask.tolist() == [[True], [True]]
    empty = st_encoder.encode([])
    assert empty.pooled.shape == (0, 768) and empty.tokens.shape == (0, 1, 768)


def test_rejects_non_list_input(hash_encoder: TextEncoder) -> None:
    with pytest.raises(TextEncoderError):
        hash_encoder.encode("a single string")  # type: ignore[arg-type]
    with pytest.raises(TextEncoderError):
        hash_encoder.encode(["ok", 3])  # type: ignore[list-item]


def test_split_tags() -> None:
    assert split_tags(" 1girl, , Blue Eyes ,smile,") == ["1girl", "blue eyes", "smile"]
    assert split_tags("A whole sentence") == ["a whole sentence"]
    assert split_tags("") == []


def test_tag_cache_is_bounded() -> None:
    enc = TextEncoder(model_name=None, allow_bundled=False, tag_cache_size=3)
    enc.encode(["a, b, c, d, e"])
    assert len(enc._cache) == 3


# ---- hash fallback ----------------------------------------------------------------------------


def test_hash_bits_pinned() -> None:
    # sha256(b"moas") starts 0x6d61 = 0110 1101 0110 0001; sha256(b"moas#1") starts 0x87 = 1000 0111.
    expected = [-1, 1, 1, -1, 1, 1, -1, 1, -1, 1, 1, -1, -1, -1, -1, 1]
    assert _hash_bits("moas", 16).tolist() == expected
    assert _hash_bits("moas", 264)[256:].tolist() == [1, -1, -1, -1, -1, 1, 1, 1]
    bits = _hash_bits("anything at all", 700)
    assert set(bits.unique().tolist()) <= {-1.0, 1.0}


def test_hash_embedding_pinned_values() -> None:
    e = _create_hash_embedding("1girl, solo")
    assert e.shape == (384,) and e.dtype == torch.float32
    assert math.isclose(float(e.norm()), 1.0, rel_tol=1e-6)
    # The first 256 dims are the +-1 bits scaled by 1/sqrt(384) (bit part and frequency part both
    # have per-dimension scale 1, so the total norm before normalising is sqrt(384)).
    raw_bits = _hash_bits("1girl, solo", 256)
    assert torch.allclose(e[:256], raw_bits / math.sqrt(384))
    # Frequency part, from the documented rule: bucket ord(c) % 128; counts are 2 for 'l' and 'o'
    # and 1 for seven other characters, so sum of squares = 15 and 'l' = 2/sqrt(15)*sqrt(128)/sqrt(384).
    expected_l = 2 / math.sqrt(15) * math.sqrt(128) / math.sqrt(384)
    assert math.isclose(float(e[256 + ord("l")]), expected_l, rel_tol=1e-5)
    assert math.isclose(float(e[256 + ord(",")]), expected_l / 2, rel_tol=1e-5)
    assert float(e[256 + ord("z")]) == 0.0
    assert [round(v, 6) for v in e[:4].tolist()] == [0.051031, -0.051031, 0.051031, -0.051031]


def test_hash_embedding_deterministic_and_distinct() -> None:
    a = _create_hash_embedding("long hair")
    assert torch.equal(a, _create_hash_embedding("long hair"))
    b = _create_hash_embedding("short hair")
    assert not torch.equal(a, b)
    assert _create_hash_embedding("x", dim=1000).shape == (1000,)
    assert _create_hash_embedding("").shape == (384,)


def test_hash_encoder_shapes(hash_encoder: TextEncoder) -> None:
    enc = hash_encoder.encode(["1girl, Long hair, smile", "sky", "..."])
    assert enc.pooled.shape == (3, 768)
    assert enc.tokens.shape == (3, 4, 768)  # words: 1girl, long, hair, smile
    assert enc.mask.sum(1).tolist() == [4, 1, 1]
    assert enc.tags.shape == (3, 3, 768) and enc.tag_mask.sum(1).tolist() == [3, 1, 1]
    assert torch.equal(enc.pooled[:, :384], enc.pooled[:, 384:])
    # Lower-cased like the uncased MiniLM; tags and words are hashes of their own text.
    assert torch.equal(enc.tags[0, 1, :384], _create_hash_embedding("long hair"))
    assert torch.equal(enc.tokens[0, 1, :384], _create_hash_embedding("long"))
    assert torch.equal(enc.pooled[1, :384], _create_hash_embedding("sky"))
    again = hash_encoder.encode(["smile, long hair, 1girl"])
    assert {tuple(v.tolist()) for v in again.tags[0]} == {tuple(v.tolist()) for v in enc.tags[0]}
