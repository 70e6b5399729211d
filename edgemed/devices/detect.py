"""Detect the machine and choose its profile.

Probes run in the order of ``PROBES``; the first that recognises the machine
wins (the generic probe recognises anything). The profile is then the one
whose ``[match]`` table fits the facts, highest ``priority`` first.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from edgemed.devices.facts import Facts, Host, SysctlRunner, cpus_allowed
from edgemed.devices.profiles import Profile, get_profile, load_profiles
from edgemed.errors import ProfileError

# Most specific first: a Jetson is also an ARM Linux box; the generic probe takes anything.
PROBES = ("edgemed.devices.jetson", "edgemed.devices.apple", "edgemed.devices.x86", "edgemed.devices.generic")


def detect(root: Path | str = "/", sysctl: SysctlRunner | None = None) -> Facts:
    """Facts about the machine at ``root`` (a fixture tree in tests)."""
    host = Host(root, sysctl)
    for name in PROBES:
        facts = importlib.import_module(name).probe(host)
        if facts is not None:
            facts.cpu_limit = cpus_allowed(host)
            return facts
    raise AssertionError("the generic probe always answers")  # pragma: no cover


def choose(facts: Facts, profiles: dict[str, Profile] | None = None) -> Profile:
    """The matching profile with the highest priority (ties: by name)."""
    profiles = profiles if profiles is not None else load_profiles()
    candidates = [p for p in profiles.values() if p.matches(facts)]
    if not candidates:
        raise ProfileError(f"No device profile matches this {facts.platform} machine ({facts.model}).",
                           "pass --profile NAME (see `edgemed devices list`), or add a profile to $EDGEMED_PROFILES_DIR")
    return sorted(candidates, key=lambda p: (-p.priority, p.name))[0]


def resolve(profile_name: str | None, root: Path | str = "/") -> tuple[Profile, Facts]:
    """The named profile (or the detected one) and this machine's facts."""
    facts = detect(root)
    profile = get_profile(profile_name) if profile_name else choose(facts)
    return profile, facts
