"""Files and answers that edgemed parses from untrusted text, nested deeper than any real one: each reader refuses
them with its own error naming the file and the fix, never a RecursionError from the parser."""

from __future__ import annotations

import pytest

from edgemed.errors import InputError, IntegrityError, TemplateError
from edgemed.formats.nesting import MAX_DEPTH, TooDeep, loads_json, loads_toml

DEEP_JSON = "[" * 200_000 + "]" * 200_000
DEEP_TOML = "x = " + "[" * 5000 + "]" * 5000 + "\n"


def test_loads_refuse_deep_nesting_as_a_value_error():
    with pytest.raises(TooDeep, match=f"more than {MAX_DEPTH} levels"):
        loads_json(DEEP_JSON)
    with pytest.raises(ValueError):
        loads_json(DEEP_JSON.encode())
    with pytest.raises(ValueError, match="nest more than"):
        loads_toml(DEEP_TOML)
    assert loads_json('{"a": [[1]], "s": "[[[[["}') == {"a": [[1]], "s": "[[[[["}
    assert loads_toml('a = [[1]]\ns = "[[[[["\n') == {"a": [[1]], "s": "[[[[["}
    assert loads_json("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None


def test_a_registry_manifest_nested_too_deeply_is_an_integrity_error():
    from edgemed.packaging.oci import parse_ref, read_image_manifest

    ref = parse_ref("oci://127.0.0.1:5000/clinic/model:1")
    with pytest.raises(IntegrityError, match="not valid JSON .*nest more than") as e:
        read_image_manifest(('{"layers": ' + DEEP_JSON + "}").encode(), ref)
    assert e.value.fix


def test_a_card_nested_too_deeply_is_an_input_error(tmp_path):
    from edgemed.packaging.card import load_card

    card = tmp_path / "card.toml"
    card.write_text(DEEP_TOML.replace("x =", "intended_use ="))
    with pytest.raises(InputError, match="Cannot read the model card .*nest more than"):
        load_card(card)


def test_a_trust_policy_nested_too_deeply_is_an_input_error(tmp_path):
    from edgemed.packaging.trust import POLICY, load

    (tmp_path / POLICY).write_text(DEEP_TOML)
    with pytest.raises(InputError, match="Cannot read the trust policy .*nest more than"):
        load(tmp_path)


def test_a_template_file_nested_too_deeply_is_a_template_error():
    from edgemed.templates.library import _load_toml

    with pytest.raises(TemplateError, match="not valid TOML .*nest more than"):
        _load_toml(DEEP_TOML, "deep.toml")


def test_a_reply_nested_too_deeply_fails_its_json_contract():
    from edgemed.templates.contract import Contract

    parsed = Contract(kind="json", schema={"type": "object"}).parse('{"a": ' + DEEP_JSON + "}", ())
    assert not parsed.ok and "nest more than" in parsed.error


@pytest.mark.parametrize("config, says", [
    ('{"model": ', "Cannot read"),
    ("[1, 2]", "must be JSON objects"),
    ('{"model": []}', "must be JSON objects"),
    ('{"model": {"decoder": {"num_hidden_layers": "x"}}}', "'model.decoder.num_hidden_layers' must be a positive integer"),
    ('{"model": {"decoder": {"head_size": 1e308}}}', "'model.decoder.head_size' must be a positive integer"),
    ('{"model": {"context_length": true}}', "'model.context_length' must be a positive integer"),
    ('{"model": ' + DEEP_JSON + "}", "nest more than"),
])
def test_pack_refuses_a_bad_genai_config_naming_the_field(tmp_path, config, says):
    """An ONNX folder's genai_config.json sizes the memory estimate: each field is checked before it is used."""
    from click.testing import CliRunner

    from edgemed.cli import cli

    model = tmp_path / "onnx"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"\x08\x07")
    (model / "genai_config.json").write_text(config)
    (tmp_path / "LICENSE").write_text("Apache License 2.0\n")
    r = CliRunner().invoke(cli, ["pack", str(model), "--license", str(tmp_path / "LICENSE"), "--no-report",
                                 "-o", str(tmp_path / "x.edgemed")])
    assert r.exit_code == 1 and says in r.output and "Fix:" in r.output, r.output
    assert not (tmp_path / "x.edgemed").exists()


def test_a_verified_cache_nested_too_deeply_counts_as_empty(tmp_path):
    from edgemed.packaging.digest import VerifiedCache

    (tmp_path / "verified.json").write_text('{"entries": ' + DEEP_JSON + "}")
    assert VerifiedCache(tmp_path / "verified.json").entries == {}


def test_a_signature_nested_too_deeply_names_no_signer():
    from edgemed.packaging.signing import MODEL_SIG, Signature, signer_id

    assert signer_id(Signature(MODEL_SIG, ('{"verificationMaterial": ' + DEEP_JSON + "}").encode())) is None
