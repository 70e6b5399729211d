"""The one way edgemed loads a GGUF model that will compute: policy first, then the thin llama.cpp layer.

``llamacpp.Model`` loads exactly what it is given. Here, before it does, the host self-test
(``selftest.ensure``: a child process, its verdict cached per build, file and settings) says whether the
requested extra buffers survive on this host, and safer ones are chosen when they do not. The engines, the
batcher, parity, ``--quant auto``, the KLD anchor and the scorer all load through ``load_model``; only the
self-test's own child and tools that record crashes themselves use the layer directly.

LoRA adapters (GGUF adapter files) load through ``load_adapter``: the file is checked to be an adapter, for the
base's architecture, made for the checkpoint the base was converted from (both record that checkpoint's sha256:
``formats/gguf_header``'s keys) without a LoRA merged into it (``convert --lora``), before llama.cpp reads it; the adapter's metadata is then read back from llama.cpp.
A model that will carry adapters names them to ``load_model``, so the self-test's child decodes with them applied.
A server names the weights each adapter answers with by the file's sha256 (``hashed``: its bundle's, or hashed once
before the load, the file then checked unchanged once it is loaded).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from edgemed.errors import AdapterError, EdgemedError, InputError
from edgemed.runtime.engine import LoadSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter to apply: its GGUF file and llama.cpp's user scale (1.0: as trained)."""

    path: Path
    scale: float = 1.0
    #: how the file was when the bundle it comes from was verified (``packaging.ref.Vouched``: its stat stamp and
    #: sha256; None: a file given as it is); the caller that verified it compares it again once the adapter is loaded
    #: (``packaging.ref.loaded_as_verified``)
    stamp: object = field(default=None, compare=False)
    #: the sha256 of the file's bytes when known before the load (its bundle's verified digest, which the verifier
    #: compares again once loaded); None: ``hashed`` hashes the file
    sha256: str | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, text: str) -> "AdapterSpec":
        """``FILE`` or ``FILE:SCALE`` (``--adapter``): the scale a finite number from 0 to 4."""
        import math

        path, value = str(text), 1.0
        head, sep, tail = path.rpartition(":")
        if sep and head:
            try:
                path, value = head, float(tail)
            except ValueError:  # a ':' in the file's name, no scale
                pass
        if not math.isfinite(value) or not 0.0 <= value <= 4.0:
            raise InputError(f"--adapter '{text}': the scale must be a number from 0 to 4, not {value!r}.",
                             "pass FILE (scale 1, as trained) or FILE:0.5")
        if not Path(path).is_file():
            raise InputError(f"--adapter '{path}' is not a file.", "pass the .lora.gguf that `edgemed convert --adapter-only` wrote")
        return cls(Path(path), value)


def _specs(adapters) -> tuple[AdapterSpec, ...]:
    return tuple(a if isinstance(a, AdapterSpec) else AdapterSpec(Path(a)) for a in adapters or ())


class MergedBase(AdapterError):
    """The base, not the adapter, is at fault: it has a LoRA merged into its weights, so no adapter edgemed made runs
    on it (``refuse_merged_base``)."""


class BaseUnreadable(EdgemedError):
    """The base file a model was loaded from no longer reads as a GGUF (replaced, truncated or made unreadable on disk
    since the load): the fault is the server's file, not the adapter checked against it (``loaded_base_metadata``)."""


def loaded_base_metadata(base_path: Path, adapter_path: Path) -> dict:
    """The metadata of ``base_path``, the file a model already loaded came from, to check the adapter ``adapter_path``
    against; a header that no longer reads is ``BaseUnreadable``, naming the base and a restart on a good one, never
    a refusal of the adapter."""
    from edgemed.errors import IntegrityError
    from edgemed.formats.gguf_header import read_header

    try:
        return read_header(base_path).metadata
    except (InputError, IntegrityError) as exc:
        raise BaseUnreadable(
            f"The base model file '{base_path}', which this model was loaded from, no longer reads as a GGUF (it was "
            f"replaced, truncated or made unreadable since the load): {exc.problem} The adapter "
            f"'{Path(adapter_path).name}' could not be checked against it and was not loaded.",
            "put back the base the server was started on (reinstall its bundle, or convert it again) and restart the "
            "server on it; then add the adapter again") from exc


#: what to do with a base that has a LoRA merged in, at run time (``convert --adapter-only --base`` says its own)
MERGED_BASE_FIX = ("run the adapter on a GGUF converted from the checkpoint without --lora (`edgemed convert CHECKPOINT`), "
                   "or run the merged file as it is, without --adapter")


def refuse_merged_base(base_meta: dict, base_name: str, adapter_name: str, adapter_lora: str | None,
                       fix: str = MERGED_BASE_FIX) -> None:
    """Refuse a base GGUF with a LoRA merged into its weights for an adapter edgemed made.

    ``convert --lora`` writes such a file: it records the LoRA's sha256 (``LORA_SHA_KEY``) beside the checkpoint's
    (``SOURCE_SHA_KEY``), the very checkpoint an adapter of it records as its base. But the adapter was made, and
    gated, for the plain checkpoint: on the merged weights it computes base + merged LoRA + adapter (the same LoRA:
    its change twice). ``adapter_lora``: the adapter's own ``LORA_SHA_KEY``, to say which of the two it is."""
    from edgemed.formats.gguf_header import LORA_SHA_KEY

    merged = base_meta.get(LORA_SHA_KEY)
    if not isinstance(merged, str) or not merged:
        return
    if merged == adapter_lora:
        what, effect = "this very adapter", "applied again it adds its change twice"
    else:
        what, effect = f"a LoRA adapter ({merged[:12]}...)", "applied on top it changes a model it was not trained on"
    raise MergedBase(f"The base '{base_name}' already has {what} merged into its weights ({LORA_SHA_KEY}), and the "
                     f"adapter '{adapter_name}' was made and gated for the plain checkpoint: {effect}.", fix)


def check_adapter(base_meta: dict, base_path: Path, adapter_path: Path):
    """The adapter's facts, once they show it belongs on this base (``base_meta``: the base's metadata); else
    the refusal that names the fix. An adapter another tool wrote (no base record) is let through with a
    warning: llama.cpp still checks its architecture and every pair's shape."""
    from edgemed.formats.gguf_header import LORA_SHA_KEY, SOURCE_SHA_KEY, adapter_facts, read_header

    facts = adapter_facts(adapter_path)
    arch = base_meta.get("general.architecture")
    if facts.architecture != arch:
        raise AdapterError(f"The adapter '{adapter_path.name}' is for the {facts.architecture!r} architecture, but the base "
                           f"'{base_path.name}' is {arch!r}.", "use the adapter made for this base, or load the base it was made for")
    ours = base_meta.get(SOURCE_SHA_KEY)
    if facts.base_source_sha256 is None:
        log.warning("The adapter '%s' does not record which base it was made for; only its shapes are checked.", adapter_path.name)
        return facts
    if not isinstance(ours, str) or not ours:
        raise AdapterError(f"The adapter '{adapter_path.name}' was made for the checkpoint {facts.base_source_sha256[:12]}..., "
                           f"but the base '{base_path.name}' does not record which checkpoint it was converted from "
                           f"({SOURCE_SHA_KEY}), so nothing shows they belong together.",
                           "convert the base with `edgemed convert` from the checkpoint the adapter was trained on, and run "
                           "the adapter on that file")
    elif ours != facts.base_source_sha256:
        raise AdapterError(f"The adapter '{adapter_path.name}' was made for the checkpoint {facts.base_source_sha256[:12]}..., "
                           f"but the base '{base_path.name}' was converted from {ours[:12]}...: on another base it computes nonsense.",
                           "run it on a GGUF converted from the checkpoint it was made for (any quant type of it), or "
                           "re-make the adapter for this base: `edgemed convert BASE_CHECKPOINT --lora PEFT_ADAPTER --adapter-only`")
    refuse_merged_base(base_meta, base_path.name, adapter_path.name, read_header(adapter_path).metadata.get(LORA_SHA_KEY))
    return facts


def load_model(path: Path | str, load: LoadSettings | None = None, adapters=()):
    """A ``llamacpp.Model`` for ``path`` with the settings the self-test allows (``model.load`` holds them).

    ``adapters``: files (or ``AdapterSpec``) that will be applied to it; each is checked against the base before
    anything loads, and the self-test's child decodes with them applied."""
    from edgemed.formats.gguf_header import read_header
    from edgemed.runtime import llamacpp, selftest

    path = Path(path)
    # llama.cpp's libraries before the header reader's numpy: on a CUDA build (H200, numpy 2.5.2) a process that had
    # imported numpy first segfaulted at the model load; loaded in this order it loaded (docs/benchmarks.md)
    llamacpp.lib()
    header = read_header(path)  # read once: the self-test's key and the repack overrides
    if header.metadata.get("general.type") == "adapter":
        raise InputError(f"'{path.name}' is a LoRA adapter, not a model.",
                         f"pass the base model as MODEL and the adapter with --adapter {path}")
    specs = _specs(adapters)
    for spec in specs:
        check_adapter(header.metadata, path, spec.path)
    load = load or LoadSettings()
    settings = selftest.ensure(path, load, header.tensors, adapters=specs) if specs else selftest.ensure(path, load, header.tensors)
    return llamacpp.Model(path, settings, tensors=header.tensors)


#: llama.cpp's line when it refuses an adapter file (llama-adapter.cpp): the reason, without its guess at the cause
REFUSED_LINE = r"failed to apply lora adapter: (?P<why>.+?)(?: \(hint: [^)]*\))?\s*$"
#: what to do with an adapter file whose tensors or metadata do not read as its header says
DAMAGED_FIX = ("copy the adapter file again and compare its sha256 with the original's, or re-make it for this base "
               "(`edgemed convert BASE_CHECKPOINT --lora PEFT_ADAPTER --adapter-only`)")


def load_adapter(model, adapter):
    """A ``llamacpp.Adapter`` for ``model`` (``adapter``: a path or ``AdapterSpec``), checked against the base first;
    its base record is read back from llama.cpp.

    What llama.cpp finds wrong once edgemed's checks passed (a tensor's shape, a tensor the base lacks, data past the
    file's end) says nothing of which base the file was made for: edgemed already compared the base records, so the
    refusal names what llama.cpp read and never claims another base (llama.cpp's own hint guesses one)."""
    from edgemed.errors import ModelLoadError
    from edgemed.formats.gguf_header import BASE_SOURCE_KEY
    from edgemed.runtime import llamacpp, native_log

    spec = _specs([adapter])[0]
    facts = check_adapter(loaded_base_metadata(model.path, spec.path), model.path, spec.path)
    with native_log.watch(REFUSED_LINE) as said:
        try:
            loaded = llamacpp.Adapter(model, spec.path)
        except ModelLoadError as exc:
            if not said:  # llama.cpp said nothing (its log not routed here): its layer's words stand
                raise
            found = ("Its header names the checkpoint this base was converted from as its base, so its tensors are "
                     "not what that header describes: the file is damaged, or was written wrong."
                     if facts.base_source_sha256 else
                     "Its header records no base: it may be made for another model of this architecture, or damaged.")
            raise ModelLoadError(f"llama.cpp refused the LoRA adapter '{spec.path.name}' for '{model.path.name}': "
                                 f"{said[-1]['why']}. {found}", DAMAGED_FIX) from exc
    read = {"adapter.type": (loaded.meta("adapter.type"), "lora"),
            BASE_SOURCE_KEY: (loaded.meta(BASE_SOURCE_KEY), facts.base_source_sha256)}
    differ = {key: pair for key, pair in read.items() if pair[0] != pair[1]}
    if differ:
        loaded.close()
        what = "; ".join(f"{key} is {theirs!r} to llama.cpp and {ours!r} to edgemed" for key, (theirs, ours) in differ.items())
        raise InputError(f"llama.cpp and edgemed's header reader read the adapter '{spec.path.name}' differently ({what}"
                         "; None: not a string there): the file is damaged or not laid out as edgemed writes adapters, "
                         "so which base it was made for is not known.", DAMAGED_FIX)
    return loaded


def hashed(spec: AdapterSpec) -> tuple[AdapterSpec, tuple | None]:
    """``spec`` with the sha256 of its file, and the file's stamp (``files.hashing.stamp``) to give ``unchanged``
    once it is loaded; a spec that has its sha256 already (its bundle's) as it is, with None: its verifier compares
    the load (``packaging.ref.loaded_as_verified``). Reads the whole file: call it before any lock a step waits for."""
    import os
    from dataclasses import replace

    from edgemed.files.hashing import file_sha256, stamp

    if spec.sha256 is not None:
        return spec, None
    try:
        before = stamp(os.stat(spec.path))
        return replace(spec, sha256=file_sha256(spec.path)), before
    except OSError as exc:
        raise InputError(f"The adapter '{spec.path}' cannot be read: {exc.strerror or exc}.",
                         "pass a .lora.gguf file this user can read") from None


def unchanged(spec: AdapterSpec, before: tuple | None) -> None:
    """Refuse an adapter whose file was written or replaced between ``hashed`` and the end of its load: the weights
    loaded might not be the bytes whose sha256 names them."""
    import os

    from edgemed.errors import IntegrityError
    from edgemed.files.hashing import stamp

    if before is None:
        return
    try:
        now = stamp(os.stat(spec.path))
    except OSError:
        now = None
    if now != before:
        raise IntegrityError(f"'{spec.path}' changed while it loaded as an adapter (written, replaced or removed): the "
                             f"weights loaded may not be the bytes hashed as sha256 {spec.sha256}, so it is not used.",
                             "find what writes there, then load it again once nothing does")


def load_adapters(model, adapters) -> list:
    """``[(llamacpp.Adapter, scale)]`` for ``adapters`` (paths or ``AdapterSpec``); all or none (closed on error)."""
    loaded: list = []
    try:
        for spec in _specs(adapters):
            loaded.append((load_adapter(model, spec), spec.scale))
    except BaseException:
        for a, _ in loaded:
            a.close()
        raise
    return loaded
