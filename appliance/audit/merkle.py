"""RFC 6962 Merkle tree hashes over a list of leaves (0x00 leaf / 0x01 node prefixes).

The batch worker puts ``merkle_root`` of its per-record input digests in the
``batch_end`` event; later, :func:`merkle_proof` and :func:`verify_proof` show
that one record's digest was part of that job without revealing the others.
A ``str`` leaf is hashed as its UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["merkle_proof", "merkle_root", "verify_proof"]


def _bytes(leaf: bytes | str) -> bytes:
    return leaf.encode("utf-8") if isinstance(leaf, str) else leaf


def _leaf(leaf: bytes | str) -> bytes:
    return hashlib.sha256(b"\x00" + _bytes(leaf)).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly below ``n`` (n >= 2)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def _root(leaves: Sequence[bytes | str]) -> bytes:
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return _leaf(leaves[0])
    k = _split(n)
    return _node(_root(leaves[:k]), _root(leaves[k:]))


def merkle_root(leaves: Sequence[bytes | str]) -> str:
    """MTH(leaves) as hex; the empty tree's root is SHA-256 of nothing."""
    return _root(leaves).hex()


def _path(index: int, leaves: Sequence[bytes | str]) -> list[bytes]:
    n = len(leaves)
    if n <= 1:
        return []
    k = _split(n)
    if index < k:
        return [*_path(index, leaves[:k]), _root(leaves[k:])]
    return [*_path(index - k, leaves[k:]), _root(leaves[:k])]


def merkle_proof(leaves: Sequence[bytes | str], index: int) -> list[str]:
    """The audit path (hex, bottom up) proving ``leaves[index]`` is in the tree."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} is outside 0..{len(leaves) - 1}")
    return [h.hex() for h in _path(index, leaves)]


def verify_proof(leaf: bytes | str, index: int, size: int, proof: Sequence[str], root: str) -> bool:
    """True when ``proof`` shows ``leaf`` at ``index`` in a tree of ``size`` leaves with ``root``."""
    if not 0 <= index < size:
        return False
    try:
        path = [bytes.fromhex(p) for p in proof]
    except ValueError:
        return False
    # RFC 9162 section 2.1.3.2
    fn, sn = index, size - 1
    r = _leaf(leaf)
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = _node(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r.hex() == root
