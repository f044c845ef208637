"""The migration stream's encryption (STREAM over AES-256-GCM) against its test vectors."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from tccdeploy.crypto.stream import HEADER_SIZE, Decryptor, StreamError, decrypt, decrypt_iter, encrypt, encrypt_file

VECTORS = json.loads((Path(__file__).parent / "vectors" / "stream" / "vectors.json").read_text())
KEY = bytes.fromhex(VECTORS["key"])
PREFIX = bytes.fromhex(VECTORS["nonce_prefix"])


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["name"])
def test_valid_vectors(vector):
    plaintext, ciphertext = bytes.fromhex(vector["plaintext"]), bytes.fromhex(vector["ciphertext"])
    assert encrypt(KEY, plaintext, VECTORS["chunk_size"], PREFIX) == ciphertext  # the format is stable
    assert decrypt(KEY, ciphertext) == plaintext


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_vectors_are_rejected(vector):
    with pytest.raises(StreamError, match=vector["error"]):
        decrypt(KEY, bytes.fromhex(vector["ciphertext"]))


def test_the_construction_is_as_documented():
    """Chunk 0 opens with plain AES-GCM under nonce = prefix || counter 0 || flag 0, aad = header."""
    ciphertext = bytes.fromhex(VECTORS["valid"][3]["ciphertext"])
    header = ciphertext[:HEADER_SIZE]
    size = struct.unpack(">I", ciphertext[HEADER_SIZE:HEADER_SIZE + 4])[0]
    chunk = ciphertext[HEADER_SIZE + 4:HEADER_SIZE + 4 + size]
    assert AESGCM(KEY).decrypt(PREFIX + bytes(4) + b"\x00", chunk, header) == b"migration stream"


def test_the_wrong_key_is_rejected():
    with pytest.raises(StreamError):
        decrypt(os.urandom(32), bytes.fromhex(VECTORS["valid"][1]["ciphertext"]))


def test_streaming_in_arbitrary_pieces_and_bounded_memory():
    data = os.urandom(300_000)
    sink = io.BytesIO()
    encrypt_file(KEY, io.BytesIO(data), sink, chunk_size=4096)
    blob = sink.getvalue()
    pieces = [blob[i:i + 777] for i in range(0, len(blob), 777)]
    assert b"".join(decrypt_iter(KEY, pieces)) == data
    decryptor = Decryptor(KEY)
    decryptor.update(blob[:5000])
    assert len(decryptor.buffer) < 4096 + 64  # never more than about one frame held


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.integers(1, 300), st.data())
def test_any_change_is_detected(plaintext, chunk_size, data):
    blob = bytearray(encrypt(KEY, plaintext, chunk_size))
    position = data.draw(st.integers(0, len(blob) - 1))
    blob[position] ^= data.draw(st.integers(1, 255))
    try:
        result = decrypt(KEY, bytes(blob))
    except StreamError:
        return
    pytest.fail(f"a changed stream decrypted to {len(result)} bytes")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 500))
def test_round_trip(plaintext, chunk_size):
    assert decrypt(KEY, encrypt(KEY, plaintext, chunk_size)) == plaintext


def test_a_stream_carries_its_context_and_opens_only_for_it():
    """A migration's stream names its migration in the header (authenticated by every chunk):
    the destination expecting another migration refuses it, even under the same key."""
    from tccdeploy.crypto.stream import Encryptor

    key = os.urandom(32)
    enc = Encryptor(key, 1024, context=b"migration:7")
    data = enc.header + enc.update(os.urandom(5000)) + enc.finish()
    assert b"migration:7" in data[:64]
    right = Decryptor(key, context=b"migration:7")
    assert len(right.update(data)) == 5000
    right.finish()
    for expected in (b"migration:8", b""):
        with pytest.raises(StreamError, match="another context"):
            Decryptor(key, context=expected).update(data)
    plain = encrypt(key, b"x" * 100, 64)  # a stream without context is not one for a migration
    with pytest.raises(StreamError, match="another context"):
        Decryptor(key, context=b"migration:7").update(plain)
    # The context is authenticated: rewritten in the header, every chunk fails.
    forged = data.replace(b"migration:7", b"migration:8", 1)
    with pytest.raises(StreamError, match="does not authenticate"):
        Decryptor(key, context=b"migration:8").update(forged)
