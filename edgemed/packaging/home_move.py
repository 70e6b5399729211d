"""Moving edgemed's state out of ``~/.cache/edgemed`` (where earlier versions kept it) into the user's data folder.

Cache cleaners empty ``~/.cache``; with the state went the trust policy, and installs were then accepted with
"signature not checked". ``env.home()`` goes on using a state folder left there (with a warning) until
``edgemed home --move`` moves it, in two renames on one file system, so a kill at any instant leaves the state in
one folder whole:

1. the old folder is renamed to the new one, cache and all (the one step that moves the state);
2. its ``cache`` is renamed back to where caches now live (``env.default_cache_root()``), where nothing is there yet.

A kill between the two leaves the cache inside the state folder, unused; the next ``--move`` finishes step 2. The
move waits for nothing: it refuses while an edgemed command holds one of the state's locks (an install or removal
holds the store's, a pull the downloads', ``edgemed serve`` its audit log's), and it holds them all while it
renames. A command that resolved the old path before the move and opens a file under it afterwards fails with
"no such file"; nothing is written to the wrong place. Nothing is deleted, and nothing is copied: a state folder
on another file system than the data folder is left where it is, with the commands that move it by hand.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from edgemed import env
from edgemed.errors import InputError
from edgemed.files.debris import step
from edgemed.files.durable import sync_folder
from edgemed.packaging import trust

#: The lock files of a state folder (relative paths), each held by the edgemed commands that change it; every
#: ``audit/*.jsonl`` is held too (``edgemed serve`` keeps an exclusive lock on the log it writes).
LOCKS = ("store/lock", "downloads/lock", "made-dirs.lock")


@dataclass
class Moved:
    state: Path           # where the state is now
    state_moved: bool     # False: only an earlier move's cache was put back
    cache: Path | None    # where the old cache went (None: there was none, or it was left in place, see ``left``)
    left: Path | None     # a cache that could not be put back (its new place was taken): not used, not deleted


def move(old: Path | None = None, new: Path | None = None, cache: Path | None = None) -> Moved | None:
    """Move the state folder ``old`` (``env.legacy_home()``) to ``new`` (``env.default_home()``); the old cache in
    it goes to ``cache`` (``env.default_cache_root()``). None when there was nothing to move or finish."""
    if os.environ.get(env.HOME_VAR):
        raise InputError(f"${env.HOME_VAR} is set ({os.environ[env.HOME_VAR]}), so edgemed uses that folder and "
                         "there is nothing to move.",
                         f"unset {env.HOME_VAR} first to move the state into the default folder, or leave it set "
                         "to go on using that folder")
    old = old or env.legacy_home()
    new = new or env.default_home()
    cache = cache or env.default_cache_root()
    if old == new:
        return None
    if not env.holds_state(old):
        return _finish(new, cache)
    _refuse_absolute_paths_into(old)
    policy_only = _policy_only(new, old)
    if env.holds_state(new) and not policy_only:
        raise InputError(f"Both {old} and {new} hold edgemed state (a store, trust policy, audit logs or keys), and "
                         "edgemed will not merge them.",
                         f"edgemed uses {new}; move what you still need from {old} into it by hand, or set "
                         f"{env.HOME_VAR}={old} to use that folder instead")
    if new.exists() and not new.is_dir():
        raise InputError(f"{new} is there and is not a folder, so edgemed's state cannot move there.",
                         f"move {new} away, or set {env.HOME_VAR} to the folder edgemed should use")
    new.parent.mkdir(parents=True, exist_ok=True)
    if os.stat(old).st_dev != os.stat(new.parent).st_dev:
        src, dst = shlex.quote(str(old)), shlex.quote(str(new))
        raise InputError(f"{old} and {new.parent} are on different file systems: moving the state would be a copy, "
                         "which a kill could leave half-done.",
                         f"stop every edgemed command, then `mkdir -p {dst} && cp -a {src}/. {dst}/` and check it, "
                         f"then remove {old} yourself; or set {env.HOME_VAR}={old} to go on using it")
    with _holding_locks(old):
        for name in policy_only:  # a trust policy written into the new folder first (the policy steps, run before
            step(f"bring {name} into the state folder")  # the move): it joins the state, then all moves as one
            os.rename(new / name, old / name)
        sync_folder(old)
        if new.exists():  # empty, or holding only a cache: a rename onto it needs it empty
            with contextlib.suppress(OSError):
                new.rmdir()
            if new.exists():
                raise InputError(f"{new} is there and holds a cache folder, so edgemed's state cannot be renamed "
                                 "onto it.", f"move {new / env.CACHE_ENTRY} away (it is re-created), then run "
                                 "`edgemed home --move` again")
        step("rename the state folder")
        os.rename(old, new)
        sync_folder(new.parent)
    done = _finish(new, cache)
    return Moved(new, True, done.cache if done else None, done.left if done else None)


#: What the trust-policy steps write into a state folder: a new folder holding only these (and a cache) joins the old
POLICY_ENTRIES = ("keys", trust.POLICY)


def _policy_only(new: Path, old: Path) -> list[str]:
    """The entries of ``new`` to bring into ``old`` before the move: where ``new`` holds only a trust policy and its
    keys (besides a cache) and ``old`` has neither, those; else none (``new`` holds no state, or more than that)."""
    try:
        names = sorted(n for n in os.listdir(new) if n != env.CACHE_ENTRY)
    except (FileNotFoundError, NotADirectoryError):
        return []
    if not names or not set(names) <= set(POLICY_ENTRIES) or any(os.path.lexists(old / n) for n in names):
        return []
    return names


def _refuse_absolute_paths_into(old: Path) -> None:
    """A trust policy naming its keys by absolute paths inside ``old`` would name files that are gone after the move
    (and every install and run would then be refused): refused before anything moves, with the fix."""
    inside = [v for v in trust.paths_as_written(old)
              if os.path.isabs(v) and os.path.abspath(v).startswith(str(old) + os.sep)]
    if inside:
        first = inside[0]
        raise InputError(f"The trust policy {old / trust.POLICY} names {first} by its full path inside {old}, which "
                         "the move would leave pointing at nothing (every install and run would then be refused).",
                         f"write it relative to the state folder ({os.path.relpath(first, old)}), as every key and "
                         "root under it, then run `edgemed home --move` again")


def _finish(new: Path, cache: Path) -> Moved | None:
    """Step 2: ``new/cache`` (the old cache, moved along with the state) to ``cache``, where that is free."""
    inside = new / env.CACHE_ENTRY
    if not inside.is_dir() or inside.is_symlink():
        return None
    if cache.exists() or cache.is_symlink():
        return Moved(new, False, None, inside)
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        step("rename the cache back")
        os.rename(inside, cache)
    except OSError:  # another file system: the cache is only re-created
        return Moved(new, False, None, inside)
    sync_folder(cache.parent)
    return Moved(new, False, cache, None)


@contextlib.contextmanager
def _holding_locks(folder: Path):
    """Hold every lock of the state folder ``folder`` (refusing, without waiting, when a command holds one)."""
    import fcntl

    paths = [folder / rel for rel in LOCKS]
    audit = folder / "audit"
    if audit.is_dir():
        paths += sorted(audit.glob("*.jsonl"))
    fds = []
    try:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:  # missing, a link, unreadable: nothing of edgemed's holds it
                continue
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"An edgemed command is using {folder}: {path} is locked (an install or removal, "
                                 "a pull, or `edgemed serve` writing its audit log).",
                                 "stop `edgemed serve` and let installs and pulls finish, then run "
                                 "`edgemed home --move` again") from None
            except OSError:  # a file system without locks: nothing can tell a live command apart
                pass
        yield
    finally:
        for fd in fds:
            os.close(fd)

