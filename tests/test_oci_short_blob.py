"""A registry whose copy of a blob is shorter than its descriptor (its disk filled while the bundle was pushed) is
refused by name with both sizes, and the part dropped: no pull says "it resumes" of a blob no resume can finish.

It used to: the first pull downloaded the N bytes the registry had and said "stopped at N of M bytes (the registry
closed the connection) ... run the same pull again: it resumes"; the next sent ``Range: bytes=N-``, got a 416,
started over from byte 0, downloaded the N bytes again and said the same, every night on every device.

The real CNCF registry (Debian's ``docker-registry``) with the blob truncated in its filesystem storage, as a
reviewer found it; then stand-ins for the answers a registry or a proxy may give instead (a 416 that does not name
the size, a body without a length, an over-long length), and the genuine resume (a connection cut mid-blob, the
registry honouring the Range), which must keep working.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import bundle_kit
import pytest
from click.testing import CliRunner

from edgemed.cli import cli

pytest.importorskip("requests")

from edgemed.errors import EdgemedError, IntegrityError  # noqa: E402
from edgemed.packaging import oci, oci_pull  # noqa: E402


def _cli(*args, ok: bool = True):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert (r.exit_code == 0) == ok, r.output
    return r.output


# -- the real registry ---------------------------------------------------------------------------------------------

def _gguf_requests(registry, sha: str) -> list[tuple[int, int]]:
    """(status, bytes sent) of each GET of the GGUF's blob, from the registry's access log."""
    return [(r["status"], r["bytes"]) for r in registry.access() if r["method"] == "GET" and r["path"].endswith(f"/blobs/sha256:{sha}")]


def test_a_short_blob_in_the_registry_is_refused_with_both_sizes_and_never_downloaded_again(registry, tmp_path, edgemed_home):
    from edgemed.packaging import signing
    from edgemed.packaging.bundle import PackInputs, pack

    key, pub = bundle_kit.keypair(tmp_path)
    edgemed_home.mkdir(parents=True)
    (edgemed_home / "trust.toml").write_text(f'[registries."{registry.host}"]\nkeys = ["{pub}"]\n')
    src = bundle_kit.inputs(tmp_path / "src", extra_kv={"edgemed.test.unique": "short-blob"})
    man = pack(PackInputs(model=src["model"], license=src["license"], card=src["card"], name="short"), tmp_path / "short",
               as_dir=True, private_key=signing.load_private_key(key))
    ref = registry.ref("clinic/short:v1")
    _cli("push", tmp_path / "short", ref)
    gguf = next(f for f in man.files if f.role == "model")
    blob = registry.blob_file(gguf.sha256)
    whole = blob.read_bytes()
    held = len(whole) // 2
    blob.write_bytes(whole[:held])  # the registry's disk filled while it took the push
    downloads = edgemed_home / "downloads"

    def refused() -> str:
        out = _cli("pull", ref, ok=False)
        assert f"The registry holds {held} bytes for layer '{gguf.path}'" in out and f"its descriptor says {gguf.size}" in out, out
        assert "resumes" not in out and "push the bundle again" in out
        assert not list(downloads.glob("*.part")) and not (edgemed_home / "store" / "models").exists()
        return out

    refused()  # refused as the answer's length arrives, before a byte of it is written
    assert [status for status, _ in _gguf_requests(registry, gguf.sha256)] == [200]
    refused()  # and the same again, not "it resumes"
    assert [status for status, _ in _gguf_requests(registry, gguf.sha256)] == [200, 200]

    # a device that an older edgemed left with the N bytes as a part: one Range request, its 416 names the
    # registry's size; no download from byte 0 follows
    downloads.mkdir(exist_ok=True)
    (downloads / f"{gguf.sha256}.part").write_bytes(whole[:held])
    refused()
    assert [status for status, _ in _gguf_requests(registry, gguf.sha256)] == [200, 200, 416]

    blob.write_bytes(whole)  # pushed again whole: the same pull installs it
    assert "installed short" in _cli("pull", ref)


# -- what another registry or a proxy may answer ------------------------------------------------------------------

DATA = bytes(range(256)) * 40  # 10 KiB
LAYER = oci.Layer("model/tiny.gguf", "application/octet-stream", hashlib.sha256(DATA).hexdigest(), len(DATA))


class _Answers:
    """An ``oci.Client`` stand-in: each GET of the blob gets the next scripted answer, (status, headers, body), and
    is recorded with its Range header."""

    def __init__(self, *answers):
        self.answers, self.asked = list(answers), []

    def url(self, kind: str, reference: str) -> str:
        return f"http://registry.invalid/v2/models/tiny/{kind}/{reference}"

    def request(self, method: str, url: str, *, headers: dict | None = None, stream: bool = False):
        import requests
        import urllib3

        self.asked.append((headers or {}).get("Range"))
        status, head, body = self.answers.pop(0)
        r = requests.Response()
        r.status_code, r.url = status, url
        r.headers.update(head)
        r.raw = urllib3.HTTPResponse(io.BytesIO(body), preload_content=False)
        return r

    def fail(self, r, what):
        return EdgemedError(f"{what}: HTTP {r.status_code}", "")


def _fetch(client, root: Path, part: bytes | None = None):
    root.mkdir(parents=True, exist_ok=True)
    if part is not None:
        (root / f"{LAYER.sha256}.part").write_bytes(part)
    stats = oci_pull.Pulled(name="", ref="", origin="", files=1, bytes_downloaded=0, bytes_resumed=0, blobs_in_store=0,
                            signed_by=None)
    return oci_pull._fetch_blob(client, LAYER, root, oci.parse_ref("oci://registry.invalid/models/tiny:1"), stats), stats


def test_a_416_that_names_no_size_then_a_whole_blob_still_short_is_the_registrys_size(tmp_path):
    short = DATA[:4000]
    client = _Answers((416, {}, b""), (200, {}, short))  # no Content-Range, then a body without a length
    with pytest.raises(IntegrityError) as exc:
        _fetch(client, tmp_path, part=DATA[:6000])
    assert f"holds {len(short)} bytes" in str(exc.value) and f"its descriptor says {len(DATA)}" in str(exc.value)
    assert "resumes" not in str(exc.value) + exc.value.fix
    assert client.asked == ["bytes=6000-", None] and not list(tmp_path.iterdir())  # two requests, the part dropped


@pytest.mark.parametrize("status, head, held", [
    (200, {"Content-Length": str(len(DATA) + 1)}, len(DATA) + 1),                       # over-long, whole
    (200, {"Content-Length": "4000"}, 4000),                                             # short, whole
    (206, {"Content-Range": f"bytes 6000-{len(DATA)}/{len(DATA) + 1}"}, len(DATA) + 1),  # a total over the layer's
    (206, {"Content-Range": "bytes 6000-8999/9000"}, 9000),                              # a total under it
    (206, {"Content-Length": "1000"}, 7000),                                             # a range shorter than asked
    (416, {"Content-Range": "bytes */6000"}, 6000),                                      # the part is all it holds
])
def test_an_answer_whose_length_is_not_the_layers_is_refused_before_a_byte_is_written(tmp_path, status, head, held):
    resume = status != 200
    client = _Answers((status, head, DATA))
    with pytest.raises(IntegrityError) as exc:
        _fetch(client, tmp_path, part=DATA[:6000] if resume else None)
    assert f"The registry holds {held} bytes for layer 'model/tiny.gguf'" in str(exc.value)
    assert len(client.asked) == 1 and not list(tmp_path.iterdir())


def test_a_connection_cut_mid_blob_still_resumes_where_it_stopped(tmp_path):
    cut = _Answers((200, {}, DATA[:6000]))  # no length stated, the connection closed: nothing says the blob is short
    with pytest.raises(EdgemedError) as exc:
        _fetch(cut, tmp_path)
    assert not isinstance(exc.value, IntegrityError) and "it resumes where it stopped" in exc.value.fix
    assert (tmp_path / f"{LAYER.sha256}.part").stat().st_size == 6000
    rest = DATA[6000:]
    client = _Answers((206, {"Content-Range": f"bytes 6000-{len(DATA) - 1}/{len(DATA)}", "Content-Length": str(len(rest))}, rest))
    final, stats = _fetch(client, tmp_path)
    assert final.read_bytes() == DATA and client.asked == ["bytes=6000-"]
    assert (stats.bytes_resumed, stats.bytes_downloaded) == (6000, len(rest))
