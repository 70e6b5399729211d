"""Whether a bundle is an older release than the installed model it would replace.

The trust policy says who may sign a model's updates, not which release is newer: a tag moved back to an old
bundle (a mistaken retag, or someone with push rights replaying an old signed release with a known flaw) would
replace a newer model on every device that pulls it with ``--force``. So an install over an installed model
compares the two releases first, from what the signatures cover:

1. the card's ``version``, as PEP 440 versions (``packaging.version``), when both are text that parses and differ;
2. else the manifest's ``created`` (UTC), when both parse and differ;
3. else nothing orders them, and nothing is guessed: the install goes on, and says what was compared.

A card version that is not text orders nothing: ``version = 1.10`` unquoted is the TOML number 1.1, which is not the
release its maker wrote (``pack`` refuses it now; a bundle packed before that still holds the number), so such a
bundle is ordered by its creation time.

The installed side is the card of the installed copy's manifest and its ``created``, read only when its sha256 is
the one the index records (the manifest whose signature was checked at install); else the version in the index record.
An older release is refused unless the operator asks for it (``--allow-downgrade``); ``edgemed rollback NAME``
returns to the copy the store kept.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone

from edgemed.errors import EdgemedError, StoreError
from edgemed.packaging.manifest import MANIFEST, MAX_MANIFEST_BYTES, Manifest

VERSION = "version"
CREATED = "creation time"


@dataclass(frozen=True)
class Order:
    """How a bundle's release stands to the installed one's."""

    older: bool | None  # True: an older release; False: newer, or the very bundle installed; None: nothing orders them
    installed: str      # the installed release in words: "version 1.1 (created 2025-03-01T10:00:00Z)"
    new: str            # the bundle's, in the same words
    by: str             # VERSION or CREATED (what ordered them), "the same bundle", or why nothing did

    def note(self, name: str) -> str | None:
        """What an install that went ahead says of the order (None: a plain update, nothing to say)."""
        if self.older:
            return f"downgraded {name} from {self.installed} to {self.new}, an older release by its {self.by} (--allow-downgrade)"
        if self.older is None:
            return (f"could not tell whether {self.new} is older than the installed {self.installed} ({self.by}); "
                    f"installed it as an update")
        return None


def card_version(man: Manifest) -> str | None:
    """The release version the card gives (CHAI "version") in words, as the store's index records it and ``list``
    shows it: the text, or a number as Python writes it (a bundle packed before ``pack`` refused numbers), else None."""
    return _text(man.card.get("version"))


def _text(version) -> str | None:
    return str(version)[:256] if version is not None else None


def _release(version):
    """A card's ``version`` as a PEP 440 version, or None (absent, not text, or not PEP 440)."""
    from packaging import version as pep440  # a dependency of every install (pyproject)

    if not isinstance(version, str):
        return None
    try:
        return pep440.Version(version)
    except pep440.InvalidVersion:
        return None


def _instant(text: str | None) -> datetime | None:
    """A manifest's ``created`` (``2025-03-01T10:00:00Z``, as ``pack`` writes it, or ISO 8601 with an offset)."""
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def _words(version: str | None, created: str | None) -> str:
    """A release in words: "version 1.1 (created 2025-03-01T10:00:00Z)", "no version (no creation time)"."""
    return (f"version {version}" if version is not None else "no version") + \
        (f" (created {created})" if created else " (no creation time)")


def compare(installed_version, installed_created: str | None, new_version, new_created: str | None) -> Order:
    """Order a new release against the installed one: by version, else by creation time, else not at all. A version
    is the card's value (text; a number from a bundle packed before ``pack`` refused numbers orders nothing)."""
    a, b = _words(_text(installed_version), installed_created), _words(_text(new_version), new_created)
    old_v, new_v = _release(installed_version), _release(new_version)
    if old_v is not None and new_v is not None and old_v != new_v:
        return Order(new_v < old_v, a, b, VERSION)
    old_t, new_t = _instant(installed_created), _instant(new_created)
    if old_t is not None and new_t is not None and old_t != new_t:
        return Order(new_t < old_t, a, b, CREATED)
    if old_v is not None and new_v is not None:
        versions = "the same version"
    elif installed_version is None or new_version is None:
        versions = "a version on one side only" if (installed_version, new_version) != (None, None) else "no versions"
    else:
        versions = "versions that are not both PEP 440"
    if old_t is not None and new_t is not None:
        times = "the same creation time"
    else:
        times = "a creation time on one side only" if (old_t, new_t) != (None, None) else "no creation times"
    return Order(None, a, b, f"{versions} and {times}")


def installed_manifest(store, name: str, record: dict) -> Manifest | None:
    """The manifest of the installed copy of ``name``, when it is the one the index records; else None."""
    try:
        with open(store.models / name / MANIFEST, "rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != record.get("manifest_sha256"):
        return None
    try:
        return Manifest.from_bytes(data, f"the installed '{name}'")
    except EdgemedError:
        return None


def check(store, name: str, man: Manifest, manifest_bytes: bytes, origin: str | None, *,
          allow_downgrade: bool = False) -> Order:
    """Before ``man`` replaces the installed ``name``: refuse an older release (a StoreError naming both releases and
    the fixes) unless ``allow_downgrade``; return the order, for the install to report."""
    record = store.record(name) or {}
    version, created = man.card.get("version"), man.created or None
    if record.get("manifest_sha256") == hashlib.sha256(manifest_bytes).hexdigest():
        same = _words(_text(version), created)
        return Order(False, same, same, "the same bundle")
    installed = installed_manifest(store, name, record)
    if installed is not None:  # the card as signed: a number there orders nothing, though the index holds it as text
        order = compare(installed.card.get("version"), installed.created or None, version, created)
    else:
        order = compare(record.get("version"), None, version, created)
    if order.older and not allow_downgrade:
        raise StoreError(
            f"'{name}' is installed at {order.installed}; the bundle from {origin or 'a local file'} is {order.new}, an "
            f"older release by its {order.by}. A tag moved back, or an old signed release replayed, would otherwise "
            "replace the newer model without a word.",
            f"if the downgrade is deliberate, pass --allow-downgrade; to go back to the copy installed before this one, "
            f"run `edgemed rollback {name}`")
    return order
