"""The store's own files, checked before the store acts on them (``edgemed.packaging.store``).

``index.json`` and ``journal.json`` are read as plain files only (never through a link, never a
FIFO or device), bounded in size (checked before reading) and in nesting (the parser's recursion
limit), and then checked field by field: an index is an object of model name -> record with the
fields the store uses, of the right types; a journal has exactly the keys of its operation, a
valid model name, and staging names in the store's ``tmp/`` that edgemed gives to that
operation of that model, all from one process. Anything else is ``Damaged`` (the message says
why); the store answers with a ``StoreError`` (the index) or sets the file aside (the journal),
and acts on nothing it could not check.

``tmp/`` names: owner-tagged debris (``edgemed.files.debris``) is the store's; a name like an older
edgemed's staging (``install.*``, ``rm.*``, ``old.*``) carries no owner, so it is never removed,
and ``aside_of`` says which model an aside copy claims to be (the store believes it only when the
copy holds the manifest the index records).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path

from edgemed.files import debris as _debris
from edgemed.files.debris import step
from edgemed.files.state import Damaged, read_json  # noqa: F401 - the store's readers and callers use both
from edgemed.errors import InputError, StoreError
from edgemed.packaging.manifest import MANIFEST, check_name

log = logging.getLogger(__name__)

JOURNAL_MAX = 64 * 1024           # bytes: a journal edgemed writes is well under 8 KiB
INDEX_MAX = 16 * 1024 * 1024      # bytes: tens of thousands of index records
SHA256 = re.compile(r"[0-9a-f]{64}")
_WHEN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
LEGACY = re.compile(r"(install|rm|old)\..*", re.S)  # staging names of an edgemed before owner tags
_LEGACY_ASIDE = re.compile(r"old\.(?P<name>.+)\.[0-9]+", re.S)
_RECORD = {  # index record field -> (what it must be, check)
    "manifest_sha256": ("64 lower-case hex digits", lambda v: isinstance(v, str) and SHA256.fullmatch(v) is not None),
    "source": ("a path of at most 4096 characters", lambda v: isinstance(v, str) and len(v) <= 4096),
    "signed_by": ("null or a key id", lambda v: v is None or (isinstance(v, str) and len(v) <= 256)),
    "installed": ("a UTC time like 2024-01-31T12:00:00Z", lambda v: isinstance(v, str) and _WHEN.fullmatch(v) is not None),
}
_OPTIONAL = {  # fields a newer edgemed writes; a record without them is an older edgemed's and stays valid
    "origin": ("null or a location of at most 4096 characters", lambda v: v is None or (isinstance(v, str) and len(v) <= 4096)),
    "version": ("null or a version string", lambda v: v is None or (isinstance(v, str) and len(v) <= 256)),
    "signer_key": ("null or a PEM public key", lambda v: v is None or (isinstance(v, str) and len(v) <= 16384)),
    "signature_sha256": ("null or 64 lower-case hex digits", lambda v: v is None or (isinstance(v, str) and SHA256.fullmatch(v) is not None)),
    "previous": ("null or an index record", lambda v: v is None or (isinstance(v, dict) and "previous" not in v
                                                                    and record_problem(v, exact=True) is None)),
}
_JOURNAL_KEYS = {"install": {"op", "name", "sha256", "stage", "aside", "record"}, "remove": {"op", "name", "trash"}}
_STAGED_LABEL = {"stage": "install", "aside": "old-{name}", "trash": "rm-{name}"}  # journal key -> debris label


def kind(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def valid_name(name) -> bool:
    try:
        check_name(name)
    except InputError:
        return False
    return True


def record_problem(rec, exact: bool = False) -> str | None:
    """Why ``rec`` is not an index record edgemed writes (None if it is). ``exact``: no other keys either."""
    if not isinstance(rec, dict):
        return f"it is a JSON {kind(rec)}, not an object"
    for key, (what, ok) in _RECORD.items():
        if key not in rec:
            return f"it has no '{key}'"
        if not ok(rec[key]):
            return f"its '{key}' is not {what}"
    for key, (what, ok) in _OPTIONAL.items():
        if key in rec and not ok(rec[key]):
            return f"its '{key}' is not {what}"
    extra = sorted(set(rec) - set(_RECORD) - set(_OPTIONAL))
    if exact and extra:
        return f"it has fields edgemed does not write ({', '.join(ascii(k) for k in extra[:3])})"
    return None


def split_index(raw: dict) -> tuple[dict, dict]:
    """(well-formed records, damaged: name -> why) of an index object."""
    good, bad = {}, {}
    for name, rec in raw.items():
        why = "not a valid model name" if not valid_name(name) else record_problem(rec)
        if why is None:
            good[name] = rec
        else:
            bad[name] = why
    return good, bad


def staged_parts(name) -> tuple[str, str, str] | None:
    """(label, owner, suffix) of a bare owner-tagged debris name, or None for any other name (a path included)."""
    if not isinstance(name, str) or "/" in name or os.sep in name or "\0" in name:
        return None
    m = _debris._DEBRIS.fullmatch(name)
    return None if m is None else (m["label"], m["owner"], m["suffix"])


def check_journal(j) -> dict:
    """``j`` if it is a journal edgemed writes, every key present with the right type; else Damaged saying why."""
    if not isinstance(j, dict):
        raise Damaged(f"it holds a JSON {kind(j)}, not an object")
    op = j.get("op")
    if not isinstance(op, str) or op not in _JOURNAL_KEYS:
        raise Damaged("its 'op' is neither \"install\" nor \"remove\"")
    keys = _JOURNAL_KEYS[op]
    if set(j) != keys:
        missing, extra = sorted(keys - set(j)), sorted(set(j) - keys)
        raise Damaged(f"an {op} journal has the keys {', '.join(sorted(keys))}" + (f"; missing {', '.join(missing)}" if missing else "")
                       + (f"; unexpected {', '.join(ascii(k) for k in extra[:3])}" if extra else ""))
    name = j["name"]
    if not valid_name(name):
        raise Damaged("its 'name' is not a valid model name")
    owners = set()
    for key in sorted(keys & set(_STAGED_LABEL)):
        parts = staged_parts(j[key])
        if parts is None or parts[0] != _STAGED_LABEL[key].format(name=name) or parts[2]:
            raise Damaged(f"its '{key}' is not a name edgemed gives to the {key} of '{name}' in the store's tmp folder")
        owners.add(parts[1])
    if len(owners) != 1:
        raise Damaged("its staging names come from more than one edgemed process")
    if op == "install":
        if not (isinstance(j["sha256"], str) and SHA256.fullmatch(j["sha256"])):
            raise Damaged("its 'sha256' is not 64 lower-case hex digits")
        why = record_problem(j["record"], exact=True)
        if why is not None:
            raise Damaged(f"its 'record' is not an index record ({why})")
        if j["record"]["manifest_sha256"] != j["sha256"]:
            raise Damaged("its 'record' names another manifest than its 'sha256'")
    return j


def is_model_copy(path: Path, expected: str | None) -> bool:
    """True when ``path`` is a real folder holding a manifest.json (whose sha256 is ``expected``, when given)."""
    if path.is_symlink() or not path.is_dir():
        return False
    got = manifest_sha256(path)
    return got is not None and (expected is None or got == expected)


def manifest_sha256(model_dir: Path) -> str | None:
    """sha256 of ``model_dir/manifest.json``, or None when there is no such regular file."""
    p = model_dir / MANIFEST
    if p.is_symlink() or not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def aside_of(entry: str) -> str | None:
    """The model an aside copy in ``tmp/`` is named for: ``.old-NAME.edgemed-OWNER.RAND.partial`` (this
    edgemed) or ``old.NAME.PID`` (an older one); None for any other name."""
    parts = staged_parts(entry)
    if parts is not None and not parts[2] and parts[0].startswith("old-"):
        return parts[0][len("old-"):]
    m = _LEGACY_ASIDE.fullmatch(entry)
    return m["name"] if m is not None else None


def set_aside(journal: Path, why: str) -> Path:
    """Rename a journal edgemed did not write out of the way (never delete it), warn, and return its new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    n = 0
    while os.path.lexists(dest := journal.with_name(f"journal.rejected-{stamp}{f'-{n}' if n else ''}.json")):
        n += 1
    step("store.journal-set-aside")
    os.rename(journal, dest)
    log.warning("The store journal %s is not one edgemed wrote (%s). It was set aside as %s and nothing was done on its "
                "word: installed models are as they were. Check them with `edgemed list` and `edgemed verify NAME`, "
                "then delete %s.", journal, why, dest, dest)
    return dest


def read_index(path: Path, models: Path) -> dict:
    """index.json as a JSON object, records unchecked (a writer keeps the ones it does not change as they are);
    {} when there is none. StoreError, naming the file and the way out, when it is not such an object."""
    try:
        raw = read_json(path, INDEX_MAX)
    except FileNotFoundError:
        return {}
    except Damaged as exc:
        why = str(exc)
    else:
        if isinstance(raw, dict):
            return raw
        why = f"it holds a JSON {kind(raw)}, not an object of model records"
    raise StoreError(f"The store index {path} is damaged: {why}.",
                     f"move it away (mv {path} {path}.damaged), then reinstall each model in {models}: "
                     "edgemed install BUNDLE --name NAME --force")


def read_journal(path: Path) -> dict | None:
    """The journal, checked by ``check_journal``; None when there is none. Damaged for any other content."""
    try:
        return check_journal(read_json(path, JOURNAL_MAX))
    except FileNotFoundError:
        return None


def warn_legacy(tmp: Path) -> None:
    """Say (never remove) what in ``tmp/`` is named like an older edgemed's staging: nothing proves whose it is."""
    legacy = sorted(p.name for p in tmp.iterdir() if LEGACY.fullmatch(p.name))
    if legacy:
        log.warning("%s holds %d entr%s named like an older edgemed's staging (%s); edgemed cannot tell they are its own, "
                    "so it leaves them alone: delete them yourself once no older edgemed is running",
                    tmp, len(legacy), "y" if len(legacy) == 1 else "ies", ", ".join(ascii(n) for n in legacy[:3]))
