"""What a benchmark result is of: the key a raw result is kept under (``task_key``) and its parts.

Kept apart from ``runner`` (which measures) so that ``report`` (which renders, on any machine) can key the records of
a phase still going as the runner keys them, without importing the runner that imports it.
"""

from __future__ import annotations

import hashlib
import json

from edgemed import __version__
from edgemed.benchmarks.harness.accuracy import RECORDS_VERSION
from edgemed.benchmarks.harness.configs import KINDS, REFERENCE, Config, Settings

#: How the harness measures (the timing loop, the memory reading, the divergence and accuracy rules): part of every
#: result's key. Raise it with a change to that code that makes an earlier result incomparable, and the next run
#: measures everything again instead of resuming. A change to how an accuracy item is asked or scored raises
#: ``accuracy.RECORDS_VERSION`` instead, which only an accuracy result's key holds: its timings stay.
METHODS_VERSION = 1


def profile_digest(name: str | None) -> str:
    """sha256 of the device profile's settings (the named one, or the one this host detects): a result measured
    under other settings of the same name (an edited user profile, a new release's micro-batch) is measured again."""
    from edgemed.devices.detect import resolve

    profile, _ = resolve(name)
    body = json.dumps({"memory": profile.memory, "llama": profile.llama, "onnx": profile.onnx}, sort_keys=True)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def runtime_identity(kind: str) -> dict:
    """What of the installed runtime a result of ``kind`` depends on: its distributions' versions and, for llama.cpp,
    the digest of the native libraries it loads (``native_build.digest``). A llama-cpp-python rebuilt with another
    compiler keeps its version and changes its speed (README, "AMX hosts"): the digest tells the two apart."""
    from edgemed.versions import installed_version

    spec = KINDS[kind]
    ident: dict = {dist: installed_version(dist) for dist in spec.dists}
    if spec.native:
        from edgemed.runtime import native_build

        ident["native_sha256"] = native_build.digest()
    return ident


def twin_of(config: Config, configs: list[Config]) -> Config | None:
    """The configuration ``config`` differs from only in its load mode (``<quant>-mmap`` and ``<quant>``: the same
    file mapped or read in), or None. Load mode changes timing and memory, not a logit: the twin's divergence and
    accuracy stand for both."""
    if config.use_mmap is None:
        return None
    return next((c for c in configs if c is not config and (c.kind, c.path, c.dtype) == (config.kind, config.path, config.dtype)
                 and c.use_mmap != config.use_mmap), None)


def applies(config: Config, phase: str, configs: list[Config]) -> bool:
    """Whether ``phase`` measures anything of ``config``: timing always; divergence and accuracy only for a kind the
    scorer opens, and not for a load-mode twin (``twin_of``), whose scores would repeat its twin's on the same bytes."""
    return phase == "timing" or (config.spec.scored and twin_of(config, configs) is None)


def task_key(config: Config, phase: str, settings: Settings, configs: list[Config], digests: dict, profile_sha256: str) -> dict:
    """The key of one configuration x phase: a raw result is kept only while every part of it is unchanged."""
    key = {"model_sha256": digests[config.path], "profile": settings.profile, "profile_sha256": profile_sha256,
           "edgemed_version": __version__, "methods_version": METHODS_VERSION,
           "runtime": runtime_identity(config.kind), "settings_sha256": settings.digest(phase)}
    if phase == "divergence":  # the reference's truncation sets how close the KLD is to the full-vocabulary one
        from edgemed.benchmarks.harness.divergence import TOP_K
        from edgemed.converters.quality.fidelity import VERSION

        reference = next(x for x in configs if x.name == REFERENCE)
        key["fidelity_version"] = VERSION  # the rules of the figures (edgemed.converters.quality.fidelity): new rules, new results
        key["reference_sha256"] = digests[reference.path]
        key["reference_runtime"] = runtime_identity(reference.kind)  # the logits compared against come from it
        key["reference_top_k"] = TOP_K
    if phase == "accuracy":  # how an item is asked and its reply read: new rules, new scores (timings are kept)
        key["records_version"] = RECORDS_VERSION
    return key
