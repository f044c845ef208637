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


# -- each bound and refusal, exactly (issue 16) ------------------------------------------------
def _header(chunk_size: int, prefix: bytes = PREFIX) -> bytes:
    return b"TCCSTRM1" + prefix + struct.pack(">I", chunk_size)


@pytest.mark.parametrize("chunk_size, good", [(0, False), (1, True), (16 * 1024 * 1024, True),
                                              (16 * 1024 * 1024 + 1, False), (2**32 - 1, False)])
def test_a_header_names_a_chunk_size_from_1_byte_to_16_mib(chunk_size, good):
    decryptor = Decryptor(KEY)
    if good:
        assert decryptor.update(_header(chunk_size)) == b"" and decryptor.chunk_size == chunk_size
    else:
        with pytest.raises(StreamError, match=f"chunk size {chunk_size} out of range"):
            decryptor.update(_header(chunk_size))


def test_a_hostile_frame_length_is_refused_from_its_four_bytes_before_anything_is_buffered():
    for size in (2**32 - 1, 64 + 16 + 1, 15):  # 4 GiB; one byte over chunk + tag; under a tag
        decryptor = Decryptor(KEY)
        decryptor.update(_header(64))
        with pytest.raises(StreamError, match=f"frame of {size} bytes"):
            decryptor.update(struct.pack(">I", size))
    for size in (16, 64 + 16):  # the smallest and largest frames are waited for
        decryptor = Decryptor(KEY)
        decryptor.update(_header(64))
        assert decryptor.update(struct.pack(">I", size) + bytes(size - 1)) == b""


def test_the_header_is_read_a_byte_at_a_time_and_a_bad_magic_is_refused():
    from tccdeploy.crypto.stream import Encryptor

    enc = Encryptor(KEY, 32, context=b"m:1")
    blob = enc.header + enc.update(b"y" * 40) + enc.finish()
    decryptor = Decryptor(KEY, context=b"m:1")
    out = b"".join(decryptor.update(blob[i:i + 1]) for i in range(len(blob)))
    decryptor.finish()
    assert out == b"y" * 40
    with pytest.raises(StreamError, match="bad magic"):
        Decryptor(KEY).update(b"TCCSTRM3" + bytes(11))


def test_the_end_of_a_stream_is_checked():
    blob = encrypt(KEY, b"z" * 100, 32)
    with pytest.raises(StreamError, match="empty stream"):
        Decryptor(KEY).finish()
    cut = Decryptor(KEY)
    cut.update(blob[:-3])
    with pytest.raises(StreamError, match="^21 trailing bytes"):  # the last frame (4 + 4 + 16 bytes) cut by 3
        cut.finish()
    frames = Decryptor(KEY)
    frames.update(blob[:HEADER_SIZE + 4 + 32 + 16])  # the header and the first chunk only
    with pytest.raises(StreamError, match="after 1 chunk"):
        frames.finish()
    more = Decryptor(KEY)
    more.update(blob)
    with pytest.raises(StreamError, match="data after the final chunk"):
        more.update(blob[HEADER_SIZE:HEADER_SIZE + 4 + 48])


def test_a_short_chunk_that_is_not_the_last_is_refused():
    from tccdeploy.crypto.stream import _nonce

    header = _header(32)
    short = AESGCM(KEY).encrypt(_nonce(PREFIX, 0, False), b"only ten b", header)
    with pytest.raises(StreamError, match="non-final chunk of the wrong size"):
        Decryptor(KEY).update(header + struct.pack(">I", len(short)) + short)


def test_the_encryptors_parameters_are_bounded():
    from tccdeploy.crypto.stream import MAX_CHUNK, Encryptor, _nonce

    for bad, says in (({"key": bytes(31)}, "^STREAM uses a 256-bit key$"), ({"chunk_size": 0}, "^bad chunk size$"),
                      ({"chunk_size": MAX_CHUNK + 1}, "^bad chunk size$"),
                      ({"nonce_prefix": bytes(6)}, "^the nonce prefix is 7 bytes$"),
                      ({"context": bytes(257)}, "^the stream's context is at most 256 bytes$")):
        with pytest.raises(ValueError, match=says):
            Encryptor(**({"key": KEY} | bad))
    assert Encryptor(KEY, MAX_CHUNK, context=bytes(256)).header.startswith(b"TCCSTRM2")
    assert Encryptor(KEY, 1).header.startswith(b"TCCSTRM1")
    with pytest.raises(ValueError, match="^STREAM uses a 256-bit key$"):
        Decryptor(bytes(33))
    enc = Encryptor(KEY, 8)
    enc.finish()
    with pytest.raises(StreamError, match="finished"):
        enc.update(b"x")
    assert _nonce(PREFIX, 2**32 - 1, True) == PREFIX + b"\xff\xff\xff\xff\x01"
    with pytest.raises(StreamError, match="counter would wrap"):
        _nonce(PREFIX, 2**32, False)


def test_encrypt_file_says_how_many_bytes_it_wrote():
    sink = io.BytesIO()
    written = encrypt_file(KEY, io.BytesIO(b"q" * 10_000), sink, chunk_size=4096)
    assert written == len(sink.getvalue()) == HEADER_SIZE + 3 * 4 + 10_000 + 3 * 16


# -- the copy-free path the migration takes (issue 20) ------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=5000), st.integers(1, 700), st.lists(st.integers(1, 900), min_size=1, max_size=8))
def test_update_into_a_reused_buffer_in_any_pieces_round_trips(plaintext, chunk_size, cuts):
    """One output buffer for the whole stream, on both ends, the input cut anywhere: frames and
    plaintext come out exactly as from update()."""
    from tccdeploy.crypto.stream import Encryptor

    enc = Encryptor(KEY, chunk_size, nonce_prefix=PREFIX)
    blob = bytearray(enc.header)
    scratch = bytearray(8192 + 4 * chunk_size)
    pos, i = 0, 0
    while pos < len(plaintext):
        piece = memoryview(plaintext)[pos:pos + cuts[i % len(cuts)]]
        blob += scratch[:enc.update_into(piece, scratch)]
        pos, i = pos + len(piece), i + 1
    blob += enc.finish()
    assert bytes(blob) == encrypt(KEY, plaintext, chunk_size, PREFIX)
    dec, out, plain = Decryptor(KEY), bytearray(len(blob) + 64), bytearray()
    pos = 0
    while pos < len(blob):
        piece = memoryview(blob)[pos:pos + cuts[i % len(cuts)]]
        plain += out[:dec.update_into(piece, out)]
        pos, i = pos + len(piece), i + 1
    dec.finish()
    assert plain == plaintext


def test_update_into_refuses_an_output_too_small_for_what_it_would_write():
    from tccdeploy.crypto.stream import Encryptor

    enc = Encryptor(KEY, 16)
    assert enc.output_size(0) == 0 and enc.output_size(16) == 0 and enc.output_size(17) == 36  # the last is held
    with pytest.raises(ValueError, match="^the output holds 35 bytes; these frames need 36$"):
        enc.update_into(bytes(17), bytearray(35))
    assert enc.update_into(bytes(17), bytearray(36)) == 36
    blob = encrypt(KEY, bytes(40), 16)
    with pytest.raises(ValueError, match=f"^the output holds 10 bytes; give at least {len(blob)}$"):
        Decryptor(KEY).update_into(blob, bytearray(10))


def test_input_of_any_item_size_is_read_as_bytes():
    import array

    words = array.array("H", range(1000))
    from tccdeploy.crypto.stream import Encryptor

    enc = Encryptor(KEY, 64, nonce_prefix=PREFIX)
    blob = enc.header + enc.update(memoryview(words)) + enc.finish()
    assert blob == encrypt(KEY, words.tobytes(), 64, PREFIX)
    whole = len(blob) // 4 * 4
    dec = Decryptor(KEY)
    plain = dec.update(memoryview(array.array("I", blob[:whole]))) + dec.update(blob[whole:])
    dec.finish()
    assert plain == words.tobytes()


def test_a_chunk_that_fails_leaves_no_unauthenticated_plaintext_in_the_output():
    """AES-GCM writes the plaintext before it checks the tag: the decryptor wipes it again."""
    blob = bytearray(encrypt(KEY, b"secret guest memory" * 10, 64, PREFIX))
    blob[-5] ^= 1  # in the last chunk
    out = bytearray(len(blob))
    dec = Decryptor(KEY)
    with pytest.raises(StreamError, match="chunk 2 does not authenticate"):
        dec.update_into(blob, out)
    assert out[:128] == (b"secret guest memory" * 10)[:128]  # the two good chunks
    assert out[128:] == bytes(len(out) - 128)


def test_an_encryptor_finishes_once():
    from tccdeploy.crypto.stream import Encryptor

    enc = Encryptor(KEY, 8)
    enc.finish()
    with pytest.raises(StreamError, match="^the stream was finished$"):
        enc.finish()


@pytest.mark.parametrize("chunk_size, cuts", [
    (4, [3, 9]),  # a held part, then two chunks and more in one piece
    (4, [3, 1, 8, 2]),  # a piece that only completes the held chunk, then whole ones
    (5, [1, 1, 1, 1, 1, 20, 7]),
    (8, [17, 3, 30]),
])
def test_update_into_across_held_chunks_makes_the_same_frames(chunk_size: int, cuts: list[int]):
    from tccdeploy.crypto.stream import Encryptor

    plaintext = bytes(range(sum(cuts)))
    enc = Encryptor(KEY, chunk_size, nonce_prefix=PREFIX)
    out, blob, at = bytearray(4096), bytearray(enc.header), 0
    for cut in cuts:
        blob += out[:enc.update_into(plaintext[at:at + cut], out)]
        at += cut
    assert bytes(blob + enc.finish()) == encrypt(KEY, plaintext, chunk_size, PREFIX)


def test_a_length_prefix_split_across_pieces_then_more_frames_opens():
    blob = encrypt(KEY, bytes(range(200)), 16, PREFIX)
    first = HEADER_SIZE + 2  # the header and two bytes of the first frame's length
    dec = Decryptor(KEY)
    out = bytearray(len(blob))
    assert dec.update_into(blob[:first], out) == 0
    got = bytes(out[:dec.update_into(blob[first:], out)])  # the rest of that length, and every frame after it
    dec.finish()
    assert got == bytes(range(200))


def test_a_stream_of_only_its_header_is_truncated_not_empty():
    dec = Decryptor(KEY, context=b"m:1")
    from tccdeploy.crypto.stream import Encryptor

    dec.update(Encryptor(KEY, 16, context=b"m:1").header)
    with pytest.raises(StreamError, match=r"^the stream ended after 0 chunk\(s\) without its final chunk \(truncated\)$"):
        dec.finish()


def test_the_output_must_also_hold_the_frame_begun_in_an_earlier_piece():
    blob = encrypt(KEY, bytes(100), 64, PREFIX)
    dec = Decryptor(KEY)
    dec.update(blob[:HEADER_SIZE + 30])  # 30 bytes of the first frame wait in the buffer
    rest = blob[HEADER_SIZE + 30:]
    with pytest.raises(ValueError, match=f"^the output holds {len(rest)} bytes; give at least {len(rest) + 30}$"):
        dec.update_into(rest, bytearray(len(rest)))


def test_data_after_the_final_chunk_is_refused_when_it_completes_a_held_frame():
    blob = encrypt(KEY, b"z" * 10, 16, PREFIX)
    frame = blob[HEADER_SIZE:]
    dec = Decryptor(KEY)
    dec.update(blob)
    dec.update(frame[:3])  # a frame begins after the end
    with pytest.raises(StreamError, match="^data after the final chunk$"):
        dec.update(frame[3:])


def test_frames_after_the_header_may_come_as_a_view_of_any_item_size():
    import array

    blob = encrypt(KEY, bytes(range(256)) * 4, 64, PREFIX)
    dec = Decryptor(KEY)
    body = blob[HEADER_SIZE:]
    whole = len(body) // 4 * 4
    plain = dec.update(blob[:HEADER_SIZE]) + dec.update(memoryview(array.array("I", body[:whole]))) + dec.update(body[whole:])
    dec.finish()
    assert plain == bytes(range(256)) * 4
