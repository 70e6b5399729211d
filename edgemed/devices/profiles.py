"""Load device profiles: the shipped ``device_profiles/`` plus the user's folders.

A user profile with the same name as a shipped one replaces it. User folders are read in ``env.profile_dirs``'s
order, ``$EDGEMED_HOME/profiles`` first and then each folder ``$EDGEMED_PROFILES_DIR`` names: a later folder's file
replaces an earlier one's of the same name (a folder the user names wins over the default one), with one warning
naming both files, as a stale copy would otherwise stand in without a word. Each file is
validated against ``schema.FIELDS`` on load; its name must match its file stem.
A user's file is untrusted input: it must be a regular file (not a directory, FIFO
or symlink loop) of at most ``MAX_PROFILE_BYTES`` of UTF-8 TOML nesting at most
``bounded.MAX_DEPTH`` deep, or it does not read: a ``ProfileError`` names it.

A file that does not read stops what weighs every profile (detection, ``edgemed
devices list``: the profile it holds might be the one that should win) and what
asks for its name; anything else leaves it out with one warning naming it and the
fix, so an upgrade that tightens the schema stops only the commands that use it.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgemed import env
from edgemed.devices.facts import GIB, Facts
from edgemed.devices.schema import inert, validate
from edgemed.errors import ProfileError
from edgemed.formats.input_file import NotRegular, read_at_most
from edgemed.formats.nesting import MAX_DEPTH, too_deep

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


log = logging.getLogger(__name__)

#: A profile is about 1 KB of TOML; anything far larger is not one.
MAX_PROFILE_BYTES = 256 << 10

#: warnings this process has logged: each once, however often the profiles are read (a bench reads them per result)
_SAID: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        log.warning("%s", message)


def _names(model: str, words: str) -> bool:
    """Whether the device name ``model`` (lower case) holds ``words`` as whole words: "Apple M1" names an "Apple M1
    Pro", not an "Apple M10"; "Orin NX" names a "Jetson Orin NX 16GB"."""
    return re.search(r"(?<![0-9a-z])" + re.escape(words.lower()) + r"(?![0-9a-z])", model) is not None


def _gib(n: float) -> str:
    """Bytes as GiB, one decimal unless a second tells two sizes apart (2.05 GiB is not the 2.0 GiB reserve)."""
    one, two = f"{n / GIB:.1f}", f"{n / GIB:.2f}"
    return one if float(one) == float(two) else two


@dataclass(frozen=True)
class Profile:
    """One device class: how to recognise it, its memory budget and its engine settings."""

    name: str
    description: str
    priority: int
    recommended_quant: str
    match: dict
    memory: dict
    llama: dict
    onnx: dict
    source: str

    # -- matching ---------------------------------------------------------------------
    def matches(self, facts: Facts) -> bool:
        """True when every rule in ``[match]`` holds for ``facts``."""
        m = self.match
        gb = facts.memory_bytes / GIB
        model = facts.model.lower()
        return (
            m["platform"] in (facts.platform, "any")
            and (not m.get("model_contains") or any(_names(model, s) for s in m["model_contains"]))
            and set(m.get("cpu_flags", ())) <= facts.cpu_flags
            and gb >= m.get("min_memory_gb", 0)
            and gb <= m.get("max_memory_gb", float("inf"))
        )

    # -- memory -----------------------------------------------------------------------
    def total_memory_bytes(self, facts: Facts | None, here: bool = False) -> int:
        """The device's memory: the profile's fixed size (the module's MemTotal, for planning off the device), else
        what detection found. On the device (``facts`` match the profile, or ``here``: the model will load on this
        machine whatever profile was named) never more than the machine may use: its RAM, or its container's limit
        when lower. Planned for the profile from another machine, this machine's memory and limits play no part."""
        if "total_gb" in self.memory:
            total = int(self.memory["total_gb"] * GIB)
            if facts is not None and facts.usable_memory_bytes and (here or self.matches(facts)):
                total = min(total, facts.usable_memory_bytes)
            return total
        if facts is None:  # planned with no machine at hand (a package's card, `convert --fit-profile`)
            raise ProfileError(
                f"Profile '{self.name}' has no fixed memory size and this machine's memory is unknown.",
                "run on the device itself, or choose a profile with memory.total_gb",
            )
        if not facts.usable_memory_bytes:  # on the device (or a --root tree of it), and detection read no size
            raise ProfileError(
                f"Profile '{self.name}' has no fixed memory size and this machine's memory is unknown: detection "
                "found no size for it.",
                "pass `edgemed plan MODEL --budget-mb N` with the MiB a model may use on this machine; for `run`, "
                "`chat` and `serve`, name a profile with memory.total_gb (--profile), or give this one a size (copy "
                f"its TOML, its path: `edgemed devices show {self.name}`, into a folder named in "
                f"${env.PROFILES_VAR} and set memory.total_gb: a user profile overrides the shipped one of the same "
                "name)",
            )
        return facts.usable_memory_bytes

    def memory_cap_note(self, facts: Facts | None, here: bool = False) -> str:
        """Why the total is below the profile's fixed size (this machine's RAM or container limit), or ""."""
        fixed = int(self.memory.get("total_gb", 0) * GIB)
        total = self.total_memory_bytes(facts, here) if fixed else 0
        if not fixed or total >= fixed or facts is None:
            return ""
        limit = facts.memory_limit_bytes and facts.memory_limit_bytes < facts.memory_bytes
        return (f"the profile's {fixed / GIB:.1f} GiB is capped at the {total / GIB:.1f} GiB this machine may use"
                f"{' (its container limit)' if limit else ''}")

    def budget_bytes(self, facts: Facts | None, here: bool = False, reserve: bool = True) -> int:
        """Bytes a model may use: total minus the OS reserve, capped at ``max_fraction`` of total; or, where the
        GPU's wired-memory limit was set on this machine (``gpu_wired_limit``), capped at that limit instead.
        ``reserve=False``: the same without the reserve (what ``memory.reserve_gb`` costs, for ``reserve_note``)."""
        total = self.total_memory_bytes(facts, here)
        wired = self.gpu_wired_limit(facts, here)
        cap = min(wired, total) if wired else total * self.memory["max_fraction"]
        kept = self.memory["reserve_gb"] * GIB if reserve else 0
        return int(max(0, min(total - kept, cap)))

    def reserve_note(self, facts: Facts | None, here: bool = False) -> tuple[str, str]:
        """Where the OS reserve (``memory.reserve_gb``) is what limits the budget: what it takes of the memory there is
        and the fixes that give a model more room, as ``(note, fix)``; ``("", "")`` where the ``max_fraction`` cap or
        a wired limit binds instead. ``runtime.plan.make_plan`` adds them to a refusal the reserve causes (a budget
        of 0 fits no quant, so "use a smaller quant" alone would send the user the wrong way)."""
        total = self.total_memory_bytes(facts, here)
        reserve = self.memory["reserve_gb"] * GIB
        if self.budget_bytes(facts, here) >= self.budget_bytes(facts, here, reserve=False):
            return "", ""
        fixed = "total_gb" in self.memory and total >= int(self.memory["total_gb"] * GIB)
        limit = facts is not None and bool(facts.memory_limit_bytes) and facts.memory_limit_bytes < facts.memory_bytes
        if fixed:
            where, more = f"the profile's memory.total_gb {_gib(total)} GiB", "a larger memory.total_gb"
        else:
            where = f"the {_gib(total)} GiB this machine may use{' (its container limit)' if limit else ''}"
            more = ("a higher container memory limit (docker run --memory, the cgroup's memory.max)" if limit
                    else "a machine with more memory")
        left = max(0, total - reserve)
        note = (f"memory.reserve_gb {_gib(reserve)} GiB (kept for the OS and the software beside the "
                f"model) of {where} leaves {'nothing' if not left else f'{left / (1 << 20):.0f} MiB'} for a model")
        fix = (f"give the model room: {more}, or a profile with a smaller memory.reserve_gb (copy this one's TOML, its "
               f"path: `edgemed devices show {self.name}`, into a folder named in ${env.PROFILES_VAR} and lower "
               "reserve_gb: a user profile overrides the shipped one of the same name); `edgemed plan MODEL "
               "--budget-mb N` shows what N MiB would hold")
        return note, fix

    def gpu_wired_limit(self, facts: Facts | None, here: bool = False) -> int | None:
        """The GPU wired-memory limit an operator set on this machine (a Mac's ``iogpu.wired_limit_mb``, raised or
        lowered), where the model's layers go to that GPU: on the device (``facts`` match, or ``here``), with a
        profile that offloads into unified memory. ``max_fraction`` stands for Metal's default working set, which
        this limit replaces. None: not set, or another machine's plan."""
        if facts is None or not facts.gpu_wired_limit_bytes or not (here or self.matches(facts)):
            return None
        return facts.gpu_wired_limit_bytes if self.memory["unified"] and self.llama["n_gpu_layers"] != 0 else None

    # -- settings ---------------------------------------------------------------------
    def threads(self, value, facts: Facts | None) -> int | None:
        """Resolve ``"physical"``/``"performance"`` against ``facts`` (None: the engine decides)."""
        if isinstance(value, int):
            return value
        if facts is None:
            return None
        if value == "performance" and facts.performance_cores:
            return min(facts.performance_cores, facts.usable_cores)
        return facts.usable_cores

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "priority": self.priority,
                "recommended_quant": self.recommended_quant, "match": self.match, "memory": self.memory,
                "llama": self.llama, "onnx": self.onnx, "source": self.source}


def _shipped_dir():
    return resources.files("edgemed.device_profiles")


def _read_text(path: Path) -> str:
    """A profile file's text: a regular file (checked on the open descriptor too, so a FIFO swapped in cannot
    block the read), at most ``MAX_PROFILE_BYTES``, UTF-8."""
    fix = f"fix or remove {path} (profiles are small UTF-8 TOML files; see `edgemed devices show generic`)"
    try:
        data = read_at_most(path, MAX_PROFILE_BYTES)
    except NotRegular as exc:
        raise ProfileError(f"{path.name}: {exc.strerror}.", fix) from None
    except IsADirectoryError:
        raise ProfileError(f"{path.name}: it is a directory, not a regular file.", fix) from None
    except OSError as exc:  # unreadable, a dangling link or a symlink loop
        raise ProfileError(f"{path.name}: cannot be read ({exc.strerror or exc}).", fix) from None
    except ValueError:
        raise ProfileError(f"{path.name}: more than the {MAX_PROFILE_BYTES} bytes a profile may have.", fix) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path.name}: not UTF-8 text (byte {exc.start}).", f"save {path} as UTF-8") from None


def read_profile(path: Path, text: str | None = None) -> Profile:
    """Parse and validate one profile file."""
    source = path.name
    text = text if text is not None else _read_text(path)
    if too_deep(text, "toml"):
        raise ProfileError(f"{source}: arrays or tables nest more than {MAX_DEPTH} deep.", f"fix the structure of {path}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{source}: not valid TOML ({exc}).", f"fix the syntax of {path}") from None
    validate(data, source)
    if data["name"] != Path(source).stem:
        raise ProfileError(f"{source}: name: '{data['name']}' does not match the file name.",
                           f"rename the file to {data['name']}.toml or set name = \"{Path(source).stem}\"")
    for note in inert(data, str(path)):
        _warn_once(note)
    return Profile(name=data["name"], description=data["description"], priority=data["priority"],
                   recommended_quant=data["recommended_quant"], match=data["match"], memory=data["memory"],
                   llama=data["llama"], onnx=data["onnx"], source=str(path))


def _named_folder(folder: Path) -> Path:
    """A folder named in ``$EDGEMED_PROFILES_DIR``: it must be one (a typo in the variable would otherwise leave the
    user's profiles out without a word, and detection pick a shipped one). ``$EDGEMED_HOME/profiles`` may be absent."""
    if not folder.is_dir():
        raise ProfileError(f"Profile folder {folder} (from ${env.PROFILES_VAR}) "
                           f"{'is not a folder' if folder.exists() else 'does not exist'}.",
                           f"point ${env.PROFILES_VAR} at a folder of profile .toml files, or take {folder} out of it "
                           "(see `edgemed devices show generic` for a valid profile)")
    return folder


def read_profiles() -> tuple[dict[str, Profile], dict[Path, ProfileError]]:
    """Every profile that reads, by name: shipped first, then user folders (``$EDGEMED_HOME/profiles``, then
    ``$EDGEMED_PROFILES_DIR``'s: later ones override, with a warning where one user file replaces another; a user's
    file that does not read takes its name out), and apart from them each user file that does not read, with why.
    Each folder named in ``$EDGEMED_PROFILES_DIR`` must exist; ``$EDGEMED_HOME/profiles`` is read where it does."""
    found: dict[str, Profile] = {}
    broken: dict[Path, ProfileError] = {}
    shipped = _shipped_dir()
    for entry in sorted(shipped.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            found[entry.name[:-5]] = read_profile(Path(str(entry)), entry.read_text(encoding="utf-8"))
    default, *named = env.profile_dirs()  # $EDGEMED_HOME/profiles, then $EDGEMED_PROFILES_DIR's folders
    users: dict[str, Path] = {}  # name -> the user file that holds it now
    for folder in [*([default] if default.is_dir() else []), *map(_named_folder, named)]:
        for path in sorted(folder.glob("*.toml")):
            if path.stem in users and users[path.stem].resolve() == path.resolve():
                continue  # one folder named twice (or $EDGEMED_HOME/profiles named in the variable): read once
            if path.stem in users:  # the earlier file, read or not, gives way to this one
                _warn_once(f"Device profile {path} replaces {users[path.stem]} of the same name (a folder in "
                           f"${env.PROFILES_VAR} wins over $EDGEMED_HOME/profiles, a later one over an earlier one); "
                           "remove the one you do not mean to use")
                broken.pop(users[path.stem], None)
            users[path.stem] = path
            try:
                found[path.stem] = read_profile(path)
            except ProfileError as exc:  # never the shipped profile of that name in its place
                found.pop(path.stem, None)
                broken[path] = exc
    if not found and not broken:
        raise ProfileError("No device profiles were found.", "reinstall edgemed: its device_profiles are missing")
    return found, broken


def load_profiles() -> dict[str, Profile]:
    """Every profile by name, for what weighs them all (detection, ``edgemed devices list``): a user's file that does
    not read stops it, naming the file and the field, as the profile it holds might be the one that should win."""
    found, broken = read_profiles()
    if broken:
        raise next(iter(broken.values()))
    return found


def _left_out(broken: dict[Path, ProfileError]) -> None:
    for path, exc in broken.items():
        _warn_once(f"Device profile {path} is left out: {exc.problem} Fix: {exc.fix}.")


def usable_profiles() -> dict[str, Profile]:
    """Every profile that reads, by name, for what takes each on its own (a bundle's memory table): a user's file that
    does not read is left out with one warning naming it and the fix."""
    found, broken = read_profiles()
    _left_out(broken)
    return found


def get_profile(name: str) -> Profile:
    """The profile called ``name``, or an error listing what exists. Only a file of that name stops it (never the
    shipped profile in its place); any other user file that does not read is left out with one warning."""
    profiles, broken = read_profiles()
    its_own = [exc for path, exc in broken.items() if path.stem == name]
    if name not in profiles and its_own:
        raise its_own[-1]  # the last folder's file: the one that would have been used
    _left_out(broken)
    if name not in profiles:
        raise ProfileError(f"No device profile named '{name}'.",
                           f"run `edgemed devices list` to see profiles; known: {', '.join(sorted(profiles))}")
    return profiles[name]
