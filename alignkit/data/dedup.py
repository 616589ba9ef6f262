"""Duplicate and contamination indexes for data cleaning, built to stream: a row goes in, a
verdict comes out, and only hashes and MinHash signatures are kept.

- :class:`ExactIndex`: 8-byte BLAKE2 digests of each kept row's canonical text.
- :class:`NearDupIndex`: datasketch's MinHash LSH over word shingles finds candidates; each
  candidate is confirmed by the Jaccard similarity its stored signature estimates, so a row is
  dropped only when the estimate reaches the threshold. The index grows with the kept rows.
- :class:`Decontaminator`: word n-grams of the eval/test texts (small, held whole).
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
from datasketch import MinHash, MinHashLSH

from alignkit.data.quality import words

SIGNATURE_CHUNK = 65536  # signatures are stored in blocks of this many rows
#: LSH band tuning: weigh missed duplicates above false candidates; false candidates are
#: dropped again by the signature check, missed ones are never seen.
LSH_WEIGHTS = (0.3, 0.7)
SHORT_TEXT_MIN_WORDS = 3  # eval texts shorter than this are too generic to mark a leak


def digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class ExactIndex:
    """Has this text been seen? One 8-byte digest per kept row (about 60 bytes in a set)."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def seen_or_add(self, text: str) -> bool:
        key = digest(text)
        if key in self._seen:
            return True
        self._seen.add(key)
        return False

    def __len__(self) -> int:
        return len(self._seen)


def _band_key(band: bytes) -> int:
    # LSH buckets keyed by a 64-bit int instead of the band's bytes: smaller, same buckets.
    return int.from_bytes(hashlib.blake2b(band, digest_size=8).digest(), "little")


class NearDupIndex:
    """Near duplicates by Jaccard similarity of word shingles (``shingle_words`` words each)."""

    def __init__(self, threshold: float, num_perm: int, shingle_words: int) -> None:
        self.threshold, self.num_perm, self.shingle_words = threshold, num_perm, shingle_words
        self.lsh = MinHashLSH(
            threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS, hashfunc=_band_key
        )
        # One MinHash, cleared per row (building one per row redoes its setup). Shingles are
        # hashed with CRC-32: deterministic like datasketch's SHA-1 default, and C-fast; the
        # MinHash permutations randomize it.
        self._minhash = MinHash(num_perm=num_perm, seed=1, hashfunc=zlib.crc32)
        self._blocks: list[np.ndarray] = []  # [SIGNATURE_CHUNK, num_perm] uint32 each
        self.rows: list[int] = []  # input row number of each kept row, by LSH key

    def signature(self, text: str) -> MinHash:
        """The MinHash of ``text``'s shingles; valid until the next call."""
        tokens = words(text)
        n = self.shingle_words
        shingles = {" ".join(tokens[i : i + n]) for i in range(max(1, len(tokens) - n + 1))}
        m = self._minhash
        m.clear()
        m.update_batch([s.encode("utf-8") for s in shingles])
        return m

    def find(self, m: MinHash) -> tuple[int, float] | None:
        """The earliest kept row whose estimated Jaccard with ``m`` reaches the threshold:
        ``(input row number, estimate)``, or None."""
        best = None
        for key in self.lsh.query(m):
            block, offset = divmod(key, SIGNATURE_CHUNK)
            estimate = float(np.mean(self._blocks[block][offset] == m.hashvalues))
            if estimate >= self.threshold and (best is None or key < best[0]):
                best = (key, estimate)
        return None if best is None else (self.rows[best[0]], best[1])

    def add(self, m: MinHash, row: int) -> None:
        key = len(self.rows)
        block, offset = divmod(key, SIGNATURE_CHUNK)
        if block == len(self._blocks):
            self._blocks.append(np.zeros((SIGNATURE_CHUNK, self.num_perm), dtype=np.uint32))
        self._blocks[block][offset] = m.hashvalues
        self.lsh.insert(key, m, check_duplication=False)
        self.rows.append(row)

    @property
    def bands(self) -> tuple[int, int]:
        """(bands, rows per band) datasketch chose for the threshold."""
        return self.lsh.b, self.lsh.r


class Decontaminator:
    """Do a training text's word n-grams overlap an eval text? Eval texts shorter than ``n``
    words (3 or more) count when a training text equals them."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._ngrams: set[int] = set()
        self._short: set[int] = set()
        self.texts = 0

    def add(self, text: str) -> None:
        tokens = words(text)
        if len(tokens) >= self.n:
            self._ngrams.update(
                digest(" ".join(tokens[i : i + self.n])) for i in self._starts(tokens)
            )
            self.texts += 1
        elif len(tokens) >= SHORT_TEXT_MIN_WORDS:
            self._short.add(digest(" ".join(tokens)))
            self.texts += 1

    def _starts(self, tokens: list[str]) -> range:
        return range(len(tokens) - self.n + 1)

    def hit(self, text: str) -> str | None:
        """The overlapping words, or None."""
        tokens = words(text)
        if len(tokens) < self.n:
            joined = " ".join(tokens)
            return joined if joined and digest(joined) in self._short else None
        for i in self._starts(tokens):
            gram = " ".join(tokens[i : i + self.n])
            if digest(gram) in self._ngrams:
                return gram
        return None

    def __bool__(self) -> bool:
        return self.texts > 0
