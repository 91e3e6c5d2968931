"""Content fingerprints of input files, so a resumed run can tell that an input changed.

``content_hash(path)`` is the sha256 of the whole file: data files, whose edits are small
and anywhere. ``sampled_fingerprint(path)`` is the same up to ``FULL_HASH_LIMIT`` bytes
(configs, tokenizers, small weights), and past it a sampled one: the size, the first and
last ``EDGE_BYTES`` (the header of a safetensors or GGUF file, the end of a pickle) and
``SAMPLES`` evenly spaced chunks. A full hash of a multi-GB safetensors, GGUF
or .bin file would read all of it at every start and every --resume (tens of seconds per
model on a network disk); new weights of the same shapes (a re-saved fine-tune) differ in
nearly every chunk, so the samples see them. What they can miss is an edit of a few bytes
between two samples. Nothing heavy is imported here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FULL_HASH_LIMIT = 64 << 20  # files up to this size are hashed whole
EDGE_BYTES = 1 << 20  # read at the start and at the end of a larger file
SAMPLES = 65  # evenly spaced chunks in between (an odd count: one is the middle)
SAMPLE_BYTES = 64 << 10
READ_BLOCK = 1 << 20


def content_hash(path: Path) -> str:
    """'sha256:<hex>' of the whole file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(READ_BLOCK):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def sampled_fingerprint(path: Path) -> str:
    """content_hash up to FULL_HASH_LIMIT bytes, else 'sampled:<hex>' of the size and the
    sampled spans (for weight files)."""
    size = path.stat().st_size
    if size <= FULL_HASH_LIMIT:
        return content_hash(path)
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        for offset, length in _sampled_spans(size):
            handle.seek(offset)
            digest.update(handle.read(length))
    return f"sampled:{digest.hexdigest()}"


def _sampled_spans(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the head, SAMPLES chunks spread between head and tail, the tail
    (smaller when the file is too small for their full sizes)."""
    edge = min(EDGE_BYTES, size // 4)
    sample = max(1, min(SAMPLE_BYTES, size // (2 * SAMPLES)))
    inner = size - 2 * edge - sample
    middle = [edge + inner * k // (SAMPLES - 1) for k in range(SAMPLES)]
    return [(0, edge), *((offset, sample) for offset in middle), (size - edge, edge)]
