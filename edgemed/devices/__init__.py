"""Device classes as data: profiles (TOML), detection per platform, and the memory budget.

``load_profiles()`` reads the shipped ``device_profiles/*.toml`` and the user's own
folders; ``detect()`` gathers facts about a machine (or a fixture tree standing in
for one) and ``choose()`` picks the profile whose ``[match]`` table fits them best.
"""

from edgemed.devices.facts import Facts
from edgemed.devices.profiles import Profile, get_profile, load_profiles

__all__ = ["Facts", "Profile", "get_profile", "load_profiles"]
