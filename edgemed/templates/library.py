"""Load templates from ``data/index.toml`` (and user folders) and build chat messages from them."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgemed import env
from edgemed.errors import TemplateError
from edgemed.formats.nesting import loads_toml
from edgemed.templates.contract import KINDS, Contract, Parsed
from edgemed.templates.sandbox import render

TOP_KEYS = {"name", "title", "system", "user", "inputs", "contract", "examples"}
REQUIRED = ("name", "title", "system", "user", "contract")
CONTRACT_KEYS = {"kind", "label", "choices", "choices_from", "schema"}


@dataclass(frozen=True)
class Template:
    """One kind of medical question: instructions, the user message layout, and the output contract."""

    name: str
    title: str
    system: str
    user: str
    inputs: dict            # input name -> {"required": bool, "default": ..., "help": str}
    contract: Contract
    examples: tuple[dict, ...]
    preamble: str
    source: str

    def fill(self, inputs: dict) -> dict:
        """Inputs with defaults applied; unknown or missing inputs are errors that name the template."""
        unknown = set(inputs) - set(self.inputs)
        if unknown:
            raise TemplateError(f"Template '{self.name}' has no input {', '.join(sorted(unknown))}.",
                                f"its inputs are: {', '.join(self.inputs)}")
        values = {}
        for key, spec in self.inputs.items():
            if key in inputs and inputs[key] not in (None, ""):
                values[key] = inputs[key]
            elif "default" in spec:
                values[key] = spec["default"]
            elif spec.get("required", True):
                raise TemplateError(f"Template '{self.name}' needs the input '{key}' ({spec.get('help', '')}).",
                                    f"pass it with --{key.replace('_', '-')} or --input {key}=...")
        options = values.get(self.contract.choices_from) if self.contract.choices_from else None
        if self.contract.choices_from and options not in (None, "") and not isinstance(options, dict):
            raise TemplateError(f"Template '{self.name}' takes '{self.contract.choices_from}' as an object of labels "
                                f"and answers, not {type(options).__name__} {str(options)[:40]!r}.",
                                "pass --options '{\"A\": \"...\", \"B\": \"...\"}'")
        if self.contract.choices_from and not options:
            raise TemplateError(f"Template '{self.name}' needs at least one option.", "pass --options '{\"A\": \"...\"}'")
        return values

    def choices(self, inputs: dict) -> tuple[str, ...]:
        return self.contract.resolve_choices(self.fill(inputs))

    def messages(self, inputs: dict) -> list[dict]:
        """System (safety preamble + task + contract) and user messages for ``inputs``."""
        values = self.fill(inputs)
        choices = self.contract.resolve_choices(values)
        where = f"template '{self.name}' ({self.source})"
        task = render(self.system, values, where).strip()
        system = "\n\n".join(p for p in (self.preamble.strip(), task, self.contract.instruction(choices)) if p)
        return [{"role": "system", "content": system}, {"role": "user", "content": render(self.user, values, where).strip()}]

    def parse(self, reply: str, inputs: dict, started_in_think: bool = False) -> Parsed:
        return self.contract.parse(reply, self.choices(inputs), started_in_think)


def _load_toml(text: str, source: str) -> dict:
    try:
        return loads_toml(text)
    except ValueError as exc:  # TOMLDecodeError and TooDeep
        raise TemplateError(f"{source}: not valid TOML ({exc}).", f"fix the syntax of {source}") from None


def _build(data: dict, source: str, preamble: str) -> Template:
    def fail(field, why):
        raise TemplateError(f"{source}: {field}: {why}.", f"fix '{field}' in {source}")

    for key in data:
        if key not in TOP_KEYS:
            fail(key, "unknown key")
    for key in REQUIRED:
        if key not in data:
            fail(key, "missing")
    contract = data["contract"]
    for key in contract:
        if key not in CONTRACT_KEYS:
            fail(f"contract.{key}", "unknown key")
    if contract.get("kind") not in KINDS:
        fail("contract.kind", f"expected one of {', '.join(KINDS)}, got {contract.get('kind')!r}")
    if contract["kind"] == "choice" and not (contract.get("choices") or contract.get("choices_from")):
        fail("contract.choices", "a choice contract needs choices or choices_from")
    if contract["kind"] == "json" and not isinstance(contract.get("schema"), dict):
        fail("contract.schema", "a json contract needs a schema table")
    inputs = data.get("inputs", {})
    for name, spec in inputs.items():
        if not isinstance(spec, dict) or set(spec) - {"required", "default", "help"}:
            fail(f"inputs.{name}", "expected a table with required / default / help")
    return Template(name=data["name"], title=data["title"], system=data["system"], user=data["user"], inputs=inputs,
                    contract=Contract(kind=contract["kind"], label=contract.get("label", "Answer"),
                                      choices=tuple(contract.get("choices", ())),
                                      choices_from=contract.get("choices_from", ""), schema=contract.get("schema", {})),
                    examples=tuple(data.get("examples", ())), preamble=preamble, source=source)


def _load_folder(read, label: str, found: dict[str, Template]) -> None:
    """``read(name) -> text``: one folder with an index.toml listing its template files."""
    index = _load_toml(read("index.toml"), f"{label}/index.toml")
    preamble = index.get("preamble", "")
    if "preamble_file" in index:
        preamble = _load_toml(read(index["preamble_file"]), f"{label}/{index['preamble_file']}").get("text", "")
    for entry in index.get("template", []):
        source = f"{label}/{entry['file']}"
        tpl = _build(_load_toml(read(entry["file"]), source), source, preamble)
        if tpl.name != entry["name"]:
            raise TemplateError(f"{source}: name: '{tpl.name}' differs from the index entry '{entry['name']}'.",
                                f"make the index and {source} agree")
        found[tpl.name] = tpl


def load_templates() -> dict[str, Template]:
    """Every template by name: shipped ones, then each folder in ``$EDGEMED_TEMPLATES_DIR``."""
    found: dict[str, Template] = {}
    shipped = resources.files("edgemed.templates") / "data"
    _load_folder(lambda name: (shipped / name).read_text(encoding="utf-8"), "edgemed/templates/data", found)
    for folder in env.template_dirs():
        if (folder / "index.toml").is_file():
            _load_folder(lambda name, f=folder: (Path(f) / name).read_text(encoding="utf-8"), str(folder), found)
    return found


def get_template(name: str) -> Template:
    templates = load_templates()
    if name not in templates:
        raise TemplateError(f"No prompt template named '{name}'.",
                            f"choose one of: {', '.join(sorted(templates))} (see `edgemed run --help`)")
    return templates[name]
