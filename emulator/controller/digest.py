"""Which chunks of the view still equal what the media holds: keyed chunk digests.

A flush must never miss a guest write, and re-encrypting and comparing the
whole view (the exact check) costs a full encryption pass.  Instead every
fill and write-back records, per 64 KiB chunk, a digest of the plaintext it
put in the view (fill) or wrote back (write-back), at a moment when the
media equals the write-back of exactly that plaintext.  A flush reads the
view once, recomputes the digests, and sends only the chunks whose digest
changed (or is unknown) through the exact per-page path.

The digest is a keyed, PMAC-like sum (why not hashlib: sha256 ran at
0.8-1.1 GB/s here, this at 2.3-3.5 GB/s, since OpenSSL's AES-XTS with
AES-NI is the fastest primitive reachable from Python):

    D(chunk) = XOR over 16-byte blocks j of XTS_K(tweak 0)(chunk)_j
             = XOR_j AES_K1(block_j XOR L * alpha^j)  XOR  (a constant)

with the XTS key K = K1 || K2 drawn at random per process and never stored
or sent anywhere (L = AES_K2(0): secret masks, distinct per block, the
offsets of PMAC/OCB).  Every chunk uses the same masks: a chunk's digest is
only ever compared with an earlier digest of the same chunk.  A guest that
does not know K changes a chunk and keeps its digest with probability
below 2^-100 per comparison (no two masked blocks of the two versions
coincide but with probability
< (2 * 4096)^2 / 2^128 = 2^-102, and then the XOR of distinct outputs of a
random permutation is zero with probability about 2^-128).  Digests live
only in memory (16 bytes per 64 KiB: 1 MiB for 4 GiB); after a restart all
are unknown and the first flush does the full exact comparison.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..crypto import COMPILED, fold_blocks
from .config import PAGE_SIZE

CHUNK_BYTES = 64 * 1024
CHUNK_PAGES = CHUNK_BYTES // PAGE_SIZE
_WORDS = CHUNK_BYTES // 8
MAX_CHUNKS = 64  # per compute call: one 4 MiB window


class ChunkDigests:
    """Per-chunk digest of the view's plaintext as last made consistent with the media.

    ``valid[c]`` says whether chunk ``c``'s digest is known; anything that
    changes the media, a page's KeyID or tweak, or a key without refilling
    must :meth:`invalidate`.  Not thread-safe.
    """

    def __init__(self, pages: int, compiled: bool = COMPILED, key: bytes | None = None) -> None:
        """``key`` (32 bytes) is drawn at random unless given (tests compare two ways
        of folding under one key); ``compiled`` folds with crypto's block loops."""
        chunks = -(-pages // CHUNK_PAGES)
        self._compiled = compiled
        self.pages = pages
        self.digest = np.zeros((chunks, 2), np.uint64)
        self.valid = np.zeros(chunks, bool)
        # XTS: two random halves (equal with probability 2^-128); one Cipher, a context per chunk
        self._cipher = Cipher(algorithms.AES(key or os.urandom(32)), modes.XTS(bytes(16)))
        self._out = np.empty(MAX_CHUNKS * _WORDS + 2, np.uint64)  # +16 bytes update_into wants
        self._zero = self.compute(memoryview(bytes(CHUNK_BYTES)))[0].copy()

    def compute(self, data: memoryview) -> np.ndarray:
        """(n, 2) digests of the whole chunks of ``data`` (at most MAX_CHUNKS of them)."""
        chunks = len(data) // CHUNK_BYTES
        assert chunks * CHUNK_BYTES == len(data) and chunks <= MAX_CHUNKS
        out = self._out.view(np.uint8)
        for i in range(chunks):
            encryptor = self._cipher.encryptor()
            encryptor.update_into(data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES],
                                  out[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES + 16].data)
        return fold_blocks(self._out[:chunks * _WORDS], CHUNK_BYTES, self._compiled)

    @staticmethod
    def whole_chunks(start: int, end: int) -> tuple[int, int]:
        """Chunks [first, last) lying entirely inside pages [start, end)."""
        return -(-start // CHUNK_PAGES), end // CHUNK_PAGES

    def invalidate(self, start: int, end: int) -> None:
        """Every chunk touching pages [start, end) is unknown from now on."""
        self.valid[start // CHUNK_PAGES:-(-end // CHUNK_PAGES)] = False

    def invalidate_all(self) -> None:
        self.valid[:] = False

    def set(self, first: int, digests: np.ndarray, which: np.ndarray | None = None) -> None:
        """Record ``digests`` for chunks ``first``.. (only where ``which``, if given)."""
        end = first + len(digests)
        if which is None:
            self.digest[first:end] = digests
            self.valid[first:end] = True
            return
        self.digest[first:end][which] = digests[which]
        self.valid[first:end] |= which

    def set_zero(self, first: int, last: int) -> None:
        """Chunks known to be all zero in the view (a hole filled from a hole)."""
        self.digest[first:last] = self._zero
        self.valid[first:last] = True

    def unchanged(self, first: int, digests: np.ndarray) -> np.ndarray:
        """Bool per chunk from ``first``: known, and equal to ``digests``."""
        n = len(digests)
        same = (self.digest[first:first + n] == digests).all(axis=1)
        return same & self.valid[first:first + n]
