"""llama.cpp parameter structs that refuse a setting they cannot carry, and read back every one they take.

Every value edgemed hands to llama.cpp's model, context and quantizer parameters goes through ``Params``;
``load_mode`` maps a profile's ``use_mmap`` / ``use_mlock`` onto the one field llama.cpp reads for them.
"""

from __future__ import annotations

import ctypes

from edgemed.runtime.engine import LoadSettings


def load_mode(lc, load: LoadSettings) -> int:
    """llama.cpp's ``load_mode`` for the profile's ``use_mmap`` / ``use_mlock`` (the struct has no such fields)."""
    if load.use_mmap:
        return lc.LLAMA_LOAD_MODE_MMAP_MLOCK if load.use_mlock else lc.LLAMA_LOAD_MODE_MMAP
    return lc.LLAMA_LOAD_MODE_MLOCK if load.use_mlock else lc.LLAMA_LOAD_MODE_NONE


class Params:
    """A llama.cpp parameter struct whose every assignment names a field the struct has and is read back.

    A ctypes structure takes an attribute it has no field for without a word: that is how ``use_mmap``
    and ``use_mlock`` stopped reaching llama.cpp when its struct replaced them with ``load_mode``. Here
    such an assignment raises, and ``written`` keeps every value set, for tests to compare with the struct
    and with what llama.cpp reports."""

    __slots__ = ("raw", "written", "_fields")

    def __init__(self, raw):
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "written", {})
        object.__setattr__(self, "_fields", {f[0]: f[1] for f in type(raw)._fields_})

    def __getattr__(self, name: str):
        return getattr(self.raw, name)

    def __setattr__(self, name: str, value) -> None:
        if name not in self._fields:
            raise AttributeError(f"llama.cpp's {type(self.raw).__name__} has no field {name!r} in this llama-cpp-python "
                                 f"build: the setting would not reach llama.cpp")
        setattr(self.raw, name, value)
        want = value.value if isinstance(value, ctypes._SimpleCData) else value
        got = getattr(self.raw, name)
        if isinstance(want, (bool, int, float)) and got != want:
            raise ValueError(f"{type(self.raw).__name__}.{name} reads back {got!r} after {want!r} was set")
        self.written[name] = got
