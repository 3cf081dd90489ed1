"""A retired signing key signs nothing from the record of its rotation on.

``inferbox signing-key create --force`` records ``signing_key_rotate`` with the
retired key's id and :data:`RULE` (``details[RULE_FIELD]``); every writer signs
with the new key from that record on (:mod:`appliance.audit.signer`).  The old
private key lives on in every backup taken before the rotation, so without
these rules whoever holds one could append records after the rotation, sign
them with it, and the log would verify.  The verifier refuses:

- a checkpoint signed with a retired key that covers the record of its
  rotation (size >= that record's seq), and a prune anchor signed with it after
  that record was written (a prune signs an older size, but later);
- a prune anchor signed with a key that another key had superseded (that key
  signed a checkpoint before it, and first signed after this one): prunes are
  signed by the command that runs them, with the box's current key, so only
  a retired key's holder signs such an anchor, and it may have removed the
  rotation record with the prefix.

A prune that removes a rotation record carries it on in its own record
(``details[CARRIED_FIELD]``: JSON ``{key id: [seq, recorded_at]}``), so the
first rule holds after retention removed the rotation.

A rotation recorded before these rules (no :data:`RULE_FIELD`) is not held to
the first: then the running services went on signing with the old key until
they were restarted.  A window export that holds neither the rotation record
nor a prune record carrying it cannot tell (the whole log is checked on the box).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from appliance.audit.canonical import AuditRecord, parse_time
from appliance.audit.checkpoint import Checkpoint

__all__ = ["CARRIED_FIELD", "EVENTS", "RULE", "RULE_FIELD", "Retirements", "superseded_prunes"]

ROTATE_EVENT = "signing_key_rotate"
PRUNE_EVENT = "audit_prune"
#: the records that retire keys: rotations, and prunes carrying the rotations they removed
EVENTS = (ROTATE_EVENT, PRUNE_EVENT)
#: the detail that puts a rotation under the rule, and its text (what an auditor reads in the record)
RULE_FIELD = "retired_key_rule"
RULE = "the retired key signs no checkpoint from this record on"
#: the detail of a prune record that carries the rotations it removed
CARRIED_FIELD = "retired_keys"

_CARRIED = msgspec.json.Decoder(dict[str, tuple[int, str]])


class Retirements:
    """The rotations under the rule among the records seen: retired key id -> (seq, recorded_at)."""

    def __init__(self) -> None:
        self.retired: dict[str, tuple[int, str]] = {}

    def _retire(self, kid: str, seq: int, at: str) -> None:
        if kid and (kid not in self.retired or seq < self.retired[kid][0]):
            self.retired[kid] = (seq, at)

    def see(self, rec: AuditRecord) -> None:
        """Note ``rec`` if it is a rotation under the rule, or a prune that carries rotations."""
        if rec.event == ROTATE_EVENT and rec.details.get(RULE_FIELD):
            kid = rec.details.get("retired_key_id", "")
            if kid != rec.details.get("key_id"):
                self._retire(kid, rec.seq, rec.recorded_at)
        elif rec.event == PRUNE_EVENT and (carried := rec.details.get(CARRIED_FIELD)):
            try:
                for kid, (seq, at) in _CARRIED.decode(carried).items():
                    self._retire(kid, seq, at)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return  # written only by the prune itself; a record edited since fails its leaf hash anyway

    def carried(self) -> str:
        """The ``CARRIED_FIELD`` value of a prune that removed the records seen ("" when none retired a key)."""
        if not self.retired:
            return ""
        return msgspec.json.encode(dict(sorted(self.retired.items()))).decode("ascii")

    def problems(self, checkpoints: Iterable[Checkpoint]) -> list[tuple[int, str]]:
        """(seq, what) for each checkpoint signed with a key after the record that retired it."""
        found: list[tuple[int, str]] = []
        for cp in checkpoints:
            retired = self.retired.get(cp.key_id)
            if retired is None:
                continue
            seq, at = retired
            if cp.size >= seq or (cp.kind == "prune" and parse_time(cp.created_at) > parse_time(at)):
                found.append(
                    (
                        seq,
                        f"{cp.kind} at size {cp.size} ({cp.created_at}) is signed with key {cp.key_id}, which "
                        f"record {seq} retired ({at}): a retired key signs nothing after its rotation, so this "
                        "checkpoint vouches for nothing (its private key may live on in old backups: a forgery, "
                        "or a writer that could not read the new key, which its service log names)",
                    )
                )
        return found


def superseded_prunes(checkpoints: Iterable[Checkpoint]) -> list[tuple[int, str]]:
    """(seq, what) for each prune anchor signed with a key a later key had superseded before it.

    ``checkpoints``: the valid ones, in the order written.  A key's place is
    where it first signed; a prune signed with key A after a checkpoint signed
    with a key B that first signed after A is refused.
    """
    first: dict[str, int] = {}
    newest = -1  #: the latest first place among the keys that signed so far
    found: list[tuple[int, str]] = []
    for place, cp in enumerate(checkpoints):
        mine = first.setdefault(cp.key_id, place)
        if cp.kind == "prune" and mine < newest:
            later = next(k for k, p in first.items() if p == newest)
            found.append(
                (
                    max(cp.size, 1),
                    f"prune at size {cp.size} ({cp.created_at}) is signed with key {cp.key_id}, which key {later} "
                    "had replaced before it: a prune is signed with the box's current key, so this one was signed "
                    "with a retired key (its private key may live on in old backups) and may have removed the "
                    "record of that rotation",
                )
            )
        newest = max(newest, mine)
    return found
