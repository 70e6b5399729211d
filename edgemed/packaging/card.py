"""The model card: the fields a clinic's AI governance asks for, read from ``card.toml``.

The reference lists are the CHAI Applied Model Card (Coalition for Health AI) and
the source attributes of ONC's HTI-1 rule for decision support interventions
(45 CFR 170.315(b)(11)). ``card.toml`` holds flat keys from the table below;
values are text, lists of text, numbers, or small tables (for metrics); ``version`` is
text (``version = "1.10"``: unquoted, TOML reads the number 1.1, and releases are ordered by it). Unknown
keys are refused (a typo must not silently drop a governance field) unless they
start with ``x_``. ``inspect`` shows which fields are missing.

Card text is printed to the operator (``inspect``, ``list``), so it holds no character a terminal acts on
(``formats.terminal_text``): line breaks and tabs only in prose, never in the fields shown on one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from edgemed.errors import InputError
from edgemed.formats.input_file import read_at_most
from edgemed.formats.nesting import loads_toml
from edgemed.formats.terminal_text import WHY_REFUSED, control_in, describe

# key -> (section, reference). Sections follow the CHAI card's order.
FIELDS: dict[str, tuple[str, str]] = {
    # Basic information / release
    "model_name": ("basic", "CHAI: model name; HTI-1: name of the intervention"),
    "developer": ("basic", "CHAI: developer; HTI-1: developer name"),
    "developer_contact": ("basic", "HTI-1: developer contact information"),
    "version": ("basic", "CHAI: release version"),
    "release_date": ("basic", "CHAI: release date"),
    "release_stage": ("basic", "CHAI: release stage (pilot, production...)"),
    "summary": ("basic", "CHAI: summary; HTI-1: description of value"),
    "regulatory_approval": ("basic", "CHAI: regulatory approval"),
    "clinical_oversight": ("basic", "CHAI: clinical oversight"),
    "keywords": ("basic", "CHAI: keywords"),
    # Uses and directions
    "intended_use": ("uses", "CHAI: intended use and workflow; HTI-1: intended use"),
    "intended_users": ("uses", "CHAI: primary intended users; HTI-1: intended user"),
    "intended_patient_population": ("uses", "CHAI: targeted patient population; HTI-1: intended patient population"),
    "decision_role": ("uses", "HTI-1: intended decision-making role (informs, augments, replaces)"),
    "how_to_use": ("uses", "CHAI: how to use"),
    "out_of_scope_use": ("uses", "CHAI and HTI-1: cautioned out-of-scope use"),
    "output_type": ("uses", "CHAI: outputs; HTI-1: output of the intervention"),
    # Warnings
    "known_limitations": ("warnings", "CHAI: known risks and limitations; HTI-1: known risks, inappropriate settings"),
    "known_biases": ("warnings", "CHAI: known biases or ethical considerations"),
    "clinical_risk_level": ("warnings", "CHAI: clinical risk level"),
    # Trust ingredients: development
    "model_type": ("development", "CHAI: model type"),
    "foundation_models": ("development", "CHAI: foundation models used"),
    "training_data": ("development", "CHAI: development data characterization; HTI-1: training data description"),
    "training_data_criteria": ("development", "HTI-1: exclusion and inclusion criteria of training data"),
    "health_equity_variables": ("development", "HTI-1: use of variables relevant to health equity (race, ethnicity, language, SOGI, SDOH)"),
    "demographic_representativeness": ("development", "HTI-1: demographic representativeness of training data"),
    "training_data_relevance": ("development", "HTI-1: relevance of training data to the intended deployed setting"),
    "bias_mitigation": ("development", "CHAI: bias mitigation approaches; HTI-1: approach to ensure fairness"),
    # External validation
    "validation_data": ("validation", "HTI-1: data source, clinical setting or environment of external validation"),
    "validation_party": ("validation", "HTI-1: party that conducted the external validation"),
    "validation_demographics": ("validation", "HTI-1: demographic representativeness of external validation data"),
    "validation_process": ("validation", "HTI-1: description of the external validation process"),
    # Key metrics
    "performance_validity": ("metrics", "CHAI: usefulness, efficacy; HTI-1: validity of prediction in test data"),
    "performance_fairness": ("metrics", "CHAI: fairness and equity; HTI-1: fairness of prediction in test data"),
    "safety_reliability": ("metrics", "CHAI: safety and reliability"),
    "outcome_evaluations": ("metrics", "HTI-1: references to evaluation of use on outcomes"),
    # Ongoing maintenance
    "update_schedule": ("maintenance", "HTI-1: update and continued validation or fairness assessment schedule"),
    "local_validity": ("maintenance", "HTI-1: validity of prediction in local data"),
    "local_fairness": ("maintenance", "HTI-1: fairness of prediction in local data"),
    "monitoring": ("maintenance", "CHAI: ongoing maintenance and monitoring"),
    "security_compliance": ("maintenance", "CHAI: security and compliance environment practices"),
    # Resources
    "references": ("resources", "CHAI: evaluation references, publications"),
    "patient_disclosure": ("resources", "CHAI: patient consent or disclosure"),
    # edgemed's own: the system prompt the model is meant to run with (exported to Ollama's SYSTEM)
    "system_prompt": ("edgemed", "edgemed: system message for chat front ends"),
}

#: A card without these says nothing a clinic can act on: pack refuses it.
REQUIRED = ("intended_use", "intended_users", "out_of_scope_use", "known_limitations")


#: Fields that name or date the model: shown on one line (``list``'s version column, a registry's annotations), so
#: without line breaks or tabs. Every other field, ``x_`` ones included, is prose.
ONE_LINE = ("model_name", "developer", "version", "release_date", "release_stage", "keywords", "decision_role",
            "clinical_risk_level", "model_type")


def is_prose(path: tuple) -> bool:
    """Whether the card value at ``path`` (its field, then any list index or table key) may hold line breaks and tabs."""
    return bool(path) and path[0] not in ONE_LINE


def _simple(value) -> bool:
    if isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, list):
        return all(isinstance(v, (str, int, float)) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in value.items())
    return False


#: ``version = 1.10`` as a line of the card, unquoted: what the maker wrote, for the fix
_UNQUOTED_VERSION = re.compile(r"^[ \t]*version[ \t]*=[ \t]*([^\s\"'#][^#\r\n]*?)[ \t]*(?:#.*)?$", re.MULTILINE)


def _check_version(path: Path, text: str, version) -> None:
    """A release version is text: TOML reads ``version = 1.10`` as the number 1.1, and installs order releases by
    the card's version (``release_order``), so 1.9 -> 1.10 would be refused as a downgrade."""
    if version is None or isinstance(version, str):
        return
    kind = ("boolean" if isinstance(version, bool) else "number" if isinstance(version, (int, float))
            else "list" if isinstance(version, list) else "table" if isinstance(version, dict) else "date or time")
    as_text = str(version)
    for written in _UNQUOTED_VERSION.finditer(text):  # the line TOML read it from (not one inside a prose field)
        try:
            if loads_toml(f"v = {written.group(1)}")["v"] == version:
                as_text = written.group(1)
                break
        except ValueError:
            continue
    raise InputError(f"The model card '{path}' gives version as a {kind} ({as_text[:40]}), not text: TOML reads an "
                     "unquoted version = 1.10 as the number 1.1, and devices order releases by the card's version, so "
                     "a later release could be refused as an older one.",
                     f"write it as text, in quotes: version = {json.dumps(as_text[:40])}")


#: A model card is a page of TOML; a larger one is the wrong file (or /dev/zero).
MAX_CARD_BYTES = 1 << 20


def load_card(path: Path) -> dict:
    """Parse and check ``card.toml``; return the fields as a flat dict."""
    try:
        text = read_at_most(Path(path), MAX_CARD_BYTES).decode("utf-8")
        data = loads_toml(text)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError, TOMLDecodeError and TooDeep are ValueErrors
        raise InputError(f"Cannot read the model card '{path}': {exc}.", "pass a TOML file (see README, section Packaging)") from None
    fault = control_in(data, is_prose)
    if fault is not None:
        where, char = fault
        raise InputError(f"The model card '{path}' field {where} holds {describe(char)}. {WHY_REFUSED} edgemed makes "
                         "no bundle whose text holds control characters (line breaks and tabs are allowed in prose "
                         "fields only), DEL or bidirectional overrides.",
                         f"remove the character from {where} in card.toml and pack again (line breaks and tabs are "
                         f"fine in prose fields, not in {', '.join(ONE_LINE)})")
    unknown = sorted(k for k in data if k not in FIELDS and not k.startswith("x_"))
    if unknown:
        raise InputError(f"The model card '{path}' has unknown fields: {', '.join(unknown)}.",
                         f"use the documented names ({', '.join(sorted(FIELDS))}) or prefix your own with x_")
    _check_version(path, text, data.get("version"))
    bad = sorted(k for k, v in data.items() if not _simple(v))
    if bad:
        raise InputError(f"Model card fields {', '.join(bad)} are nested too deeply.", "use text, lists of text, or one level of key = value")
    missing = [k for k in REQUIRED if not data.get(k)]
    if missing:
        raise InputError(f"The model card '{path}' lacks required fields: {', '.join(missing)}.",
                         "a clinic needs at least the intended use, intended users, cautioned out-of-scope use and known limitations")
    return data


def missing_fields(card: dict) -> list[str]:
    return [k for k in FIELDS if k not in card and k != "system_prompt"]


def by_section(card: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key, value in card.items():
        section = FIELDS.get(key, ("custom", ""))[0]
        out.setdefault(section, {})[key] = value
    return out
