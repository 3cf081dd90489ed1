"""A retired signing key signs nothing after the checkpoint that retired it.

``inferbox signing-key create --force`` records the rotation
(``signing_key_rotate``) and, in the same transaction, signs a format 3
checkpoint with the new key whose ``retires`` names the old key and every key
retired before it (:meth:`appliance.audit.log.AuditLog.record_rotation`).
Every writer reads the key file again inside the transaction that signs
(:mod:`appliance.audit.signer`), so no checkpoint after it, in the order
written, is signed with a retired key.  The old private key lives on in every
backup taken before the rotation; without this rule whoever holds one could
append records after the rotation, sign them with it, and the log would verify.

Checkpoints are never pruned and every export holds all of them, so the rule
holds in the database, in window exports and in ship copies, after retention
removed the rotation record.  The verifier also holds the checkpoints' order to
what writers do: no regular checkpoint smaller than a prune anchor written
before it (format 1 rows have no signed place, so a forged anchor could
otherwise be put among them), and no format 1 checkpoint after a later format.

A rotation recorded before format 3 retires nothing: its old key stays trusted
until the next rotation, whose checkpoint retires every key in
``<home>/keys/retired/``.
"""

from __future__ import annotations

from collections.abc import Sequence

from appliance.audit.checkpoint import ROTATION_VERSION, Checkpoint, pin_of

__all__ = [
    "ROTATE_EVENT",
    "order_problems",
    "pin_problems",
    "record_problems",
    "retired_by",
    "retired_signer_problem",
    "retirement_problems",
]

#: the record of a rotation; since format 3 its details name ``retired_key_ids``
ROTATE_EVENT = "signing_key_rotate"


def retired_by(checkpoints: Sequence[Checkpoint]) -> dict[str, Checkpoint]:
    """Each retired key id -> the first checkpoint (of ``checkpoints``, in the order written) retiring it."""
    retired: dict[str, Checkpoint] = {}
    for cp in checkpoints:
        for kid in cp.retired_ids:
            if kid != cp.key_id:
                retired.setdefault(kid, cp)
    return retired


def _named(cp: Checkpoint) -> str:
    return f"{cp.kind} at size {cp.size} ({cp.created_at})"


def retirement_problems(checkpoints: Sequence[Checkpoint]) -> list[tuple[int, str]]:
    """(seq, what) for each checkpoint signed with a key that a checkpoint before it retired.

    ``checkpoints``: the ones with a valid signature, in the order written.
    """
    retired: dict[str, Checkpoint] = {}
    found: list[tuple[int, str]] = []
    for cp in checkpoints:
        by = retired.get(cp.key_id)
        if by is not None:
            found.append(
                (
                    max(cp.size, 1),
                    f"{_named(cp)} is signed with key {cp.key_id}, which the rotation checkpoint at size {by.size} "
                    f"({by.created_at}, signed with key {by.key_id}) retired: a retired key signs nothing after "
                    "its rotation, and its private key may live on in old backups (a forgery; or a writer that "
                    "could not read the new key, which its service log names)",
                )
            )
        for kid in cp.retired_ids:
            if kid != cp.key_id:
                retired.setdefault(kid, cp)
    return found


def retired_signer_problem(key_id: str, checkpoints: Sequence[Checkpoint], what: str) -> str | None:
    """Why ``what`` (an export trailer) signed with ``key_id`` is not trusted, when ``checkpoints`` retire
    that key; None when they do not."""
    by = retired_by(checkpoints).get(key_id)
    if by is None:
        return None
    return (
        f"{what} is signed with key {key_id}, which the rotation checkpoint at size {by.size} ({by.created_at}) "
        "retired: a retired key signs nothing after its rotation"
    )


def pin_problems(checkpoints: Sequence[Checkpoint], valid: set[int]) -> list[tuple[int, str]]:
    """(seq, what) for each valid format 3 checkpoint (``valid``: their ``id()``) whose ``pinned`` is not the
    format 1 checkpoints before it (``checkpoints``: all of them, in the order written)."""
    found: list[tuple[int, str]] = []
    for place, cp in enumerate(checkpoints):
        if cp.version < ROTATION_VERSION or id(cp) not in valid:
            continue
        if cp.pinned != pin_of(c.signature for c in checkpoints[:place] if c.version < 2):
            found.append(
                (
                    max(cp.size, 1),
                    f"inconsistent checkpoints: the format 1 checkpoints before the rotation {_named(cp)} are not "
                    "the ones it pinned (one was replaced or removed: a format 1 checkpoint has no signed place, "
                    "so a retired key's holder could put a forged prune anchor there)",
                )
            )
    return found


def record_problems(
    rotations: Sequence[tuple[int, tuple[str, ...]]], valid: Sequence[Checkpoint]
) -> list[tuple[int, str]]:
    """(seq, what) for each rotation record (seq, the key ids it names as retired) with no valid checkpoint at
    its size retiring them: the two are written in one transaction, so the checkpoint was deleted (with
    every one after it: a retired key's holder cut the checkpoints back to sign on with that key)."""
    found: list[tuple[int, str]] = []
    for seq, ids in rotations:
        if not any(cp.size == seq and set(ids) <= set(cp.retired_ids) for cp in valid):
            found.append(
                (
                    seq,
                    f"the key rotation recorded at seq {seq} (retiring {', '.join(ids)}) has no checkpoint retiring "
                    "those keys at its size: it was deleted, and the checkpoints after it with it",
                )
            )
    return found


def order_problems(checkpoints: Sequence[Checkpoint]) -> list[tuple[int, str]]:
    """(seq, what) for checkpoints out of the order writers write them (``checkpoints``: the valid ones,
    in the order written): a regular checkpoint smaller than a prune anchor before it, a format 1 one
    after a later format."""
    found: list[tuple[int, str]] = []
    anchor: Checkpoint | None = None
    newer: Checkpoint | None = None
    for cp in checkpoints:
        if cp.version < 2 and newer is not None:
            found.append(
                (
                    max(cp.size, 1),
                    f"inconsistent checkpoints: the format 1 {_named(cp)} comes after the format "
                    f"{newer.version} {_named(newer)}; no writer goes back to format 1",
                )
            )
        if cp.version >= 2 and newer is None:
            newer = cp
        if cp.kind == "prune":
            if anchor is None or cp.size > anchor.size:
                anchor = cp
        elif anchor is not None and cp.size < anchor.size:
            found.append(
                (
                    max(cp.size, 1),
                    f"inconsistent checkpoints: {_named(cp)} comes after the prune anchor at size {anchor.size} "
                    f"({anchor.created_at}), which no writer can sign before it",
                )
            )
    return found
