"""``edgemed push``: a verified bundle into an OCI registry as one ModelPack artifact (see ``oci``).

Each bundle file is one blob, uploaded only when the registry lacks it (``HEAD`` first); the registry checks
each blob's digest as it commits it. The manifest goes last, so a tag never names an artifact whose blobs
are missing. Uploads use oras's calls: one PUT for a small file, PATCH chunks for a large one (oras reads a
monolithic upload into memory at once).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from edgemed import env
from edgemed.errors import InputError
from edgemed.files.debris import scratch_dir
from edgemed.files.hashing import file_sha256
from edgemed.packaging import oci
from edgemed.packaging.manifest import MANIFEST

log = logging.getLogger(__name__)

CHUNK = 16 << 20  # larger files go up in PATCH chunks of this size


@dataclass
class Pushed:
    ref: str            # as given (with its tag)
    digest: str         # the manifest's digest: "sha256:<hex>"
    pinned: str         # oci://HOST/REPO@sha256:... (what a device can pull, immune to a moved tag)
    layers: int
    bytes_uploaded: int
    blobs_present: int  # blobs the registry already had (not uploaded)

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def bundle_dir(arg: str | Path) -> Iterator[Path]:
    """A verified bundle directory for ``arg``: the directory itself, an installed model's folder in the store, or
    a tar bundle unpacked (every file checked against its manifest as it is written) into owner-tagged scratch
    space in ``$EDGEMED_HOME/downloads`` that goes when the push ends (or, if it is killed, with the next sweep)."""
    from edgemed.packaging.bundle import verify_dir
    from edgemed.packaging.ref import DIRECTORY, STORE, TAR, bundle_ref
    from edgemed.packaging.store import Store

    ref = bundle_ref(arg)
    if ref.kind == STORE:
        Store().verify(ref.name, full=True)
        yield Store().model_dir(ref.name)
    elif ref.kind == TAR:
        root = env.home() / "downloads"
        root.mkdir(parents=True, exist_ok=True)
        with scratch_dir(root, "push") as tmp:
            _unpack(Path(ref.path), tmp)
            yield tmp
    else:
        assert ref.kind == DIRECTORY
        verify_dir(ref.path, full=True)
        yield Path(ref.path).absolute()


def _unpack(tar: Path, dest: Path) -> None:
    from edgemed.packaging.archive import read_tar
    from edgemed.packaging.digest import copy_hashed

    def sink(entry, src) -> str:
        out = dest / entry.path
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as fh:
            return copy_hashed(src, fh, entry.size, entry.path)

    _, data, sig = read_tar(tar, sink, check_space=dest)
    (dest / MANIFEST).write_bytes(data)
    if sig is not None:
        (dest / sig.file).write_bytes(sig.data)


def bundle_layers(root: Path) -> tuple[list[tuple[Path, dict]], object]:
    """(file, layer descriptor) for every file of a verified bundle directory: manifest.json, the signature, the files."""
    from edgemed.packaging.bundle import read_manifest

    man, data, _ = read_manifest(root)
    out: list[tuple[Path, dict]] = [(root / MANIFEST, oci.layer(MANIFEST, oci.META_MEDIA[MANIFEST], hashlib.sha256(data).hexdigest(), len(data)))]
    for name, media in oci.META_MEDIA.items():
        p = root / name
        if name != MANIFEST and p.is_file() and not p.is_symlink():
            out.append((p, oci.layer(name, media, file_sha256(p), p.stat().st_size)))
    for f in man.files:
        out.append((root / f.path, oci.layer(f.path, oci.ROLE_MEDIA.get(f.role, oci.DOC_RAW), f.sha256, f.size)))
    return out, man


def push(bundle: str | Path, target: str, *, insecure: bool = False) -> Pushed:
    """Push ``bundle`` (a bundle directory or tar, or an installed name) to ``target`` (``oci://HOST[:PORT]/REPO:TAG``)."""
    ref = oci.parse_ref(target, need_tag=True)
    with bundle_dir(bundle) as root:
        return _push(root, ref, insecure)


def _push(root: Path, ref: oci.Ref, insecure: bool) -> Pushed:
    layers, man = bundle_layers(root)
    client = oci.Client(ref, insecure=insecure)
    uploaded = present = 0
    for path, desc in layers:
        if _upload(client, path, desc):
            uploaded += desc["size"]
        else:
            present += 1
    config = json.dumps(oci.model_config(man, [d["digest"] for _, d in layers]), indent=2, sort_keys=True).encode("utf-8")
    config_sha = hashlib.sha256(config).hexdigest()
    with tempfile.TemporaryDirectory(prefix="edgemed-push-") as tmp:
        cpath = Path(tmp) / "config.json"
        cpath.write_bytes(config)
        if _upload(client, cpath, {"mediaType": oci.CONFIG_TYPE, "digest": f"sha256:{config_sha}", "size": len(config)}):
            uploaded += len(config)
    manifest = oci.image_manifest(config_sha, len(config), [d for _, d in layers], man)
    r = client.oras.upload_manifest(manifest, client.container)
    if r.status_code not in (200, 201):
        raise client.fail(r, f"the manifest for {ref}")
    # requests sends ``json=`` as json.dumps(obj) in UTF-8; the registry names the digest of what it received
    digest = r.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(json.dumps(manifest).encode("utf-8")).hexdigest()
    oci.hex_of(digest, "the pushed manifest's digest")
    log.info("pushed %s (%s): %d layers, %d bytes uploaded", ref, digest, len(layers), uploaded)
    return Pushed(str(ref), digest, str(ref.at(digest)), len(layers), uploaded, present)


def _upload(client: oci.Client, path: Path, desc: dict) -> bool:
    """Upload one blob unless the registry has it; True when bytes went up."""
    head = client.request("HEAD", client.url("blobs", desc["digest"]))
    if head.status_code == 200:
        return False
    if head.status_code not in (404,):
        raise client.fail(head, f"a check for blob {desc['digest']} ('{desc.get('annotations', {}).get(oci.FILEPATH, 'config')}')")
    if os.path.getsize(path) != desc["size"]:
        raise InputError(f"'{path}' changed while it was being pushed (size {os.path.getsize(path)}, expected {desc['size']}).",
                         "push again once nothing writes to the bundle")
    import requests

    name = desc.get("annotations", {}).get(oci.FILEPATH, "config")
    try:
        if desc["size"] > CHUNK:
            r = client.oras.chunked_upload(str(path), client.container, desc, chunk_size=CHUNK)
        else:
            r = client.oras.put_upload(str(path), client.container, desc)
    except (ValueError, requests.exceptions.RequestException) as exc:  # oras raises ValueError for a missing upload location
        raise oci.RegistryError(f"The upload of '{name}' ({desc['digest']}) to {client.ref.registry} failed ({oci._short(exc)}).",
                                "check the registry's log and that this account may push there, then push again") from None
    if r.status_code not in (201, 202, 204):
        raise client.fail(r, f"the upload of '{name}' ({desc['digest']})")
    return True
