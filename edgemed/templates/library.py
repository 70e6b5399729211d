"""Load templates from ``data/index.toml`` (and user folders) and build chat messages from them."""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from edgemed import env
from edgemed.errors import TemplateError, TemplateInputError
from edgemed.formats.input_file import read_at_most
from edgemed.formats.nesting import loads_toml
from edgemed.templates.contract import JSON_TYPES, KINDS, Contract, Parsed
from edgemed.templates.sandbox import render

TOP_KEYS = {"name", "title", "system", "user", "inputs", "contract", "examples"}
REQUIRED = ("name", "title", "system", "user", "contract")
#: the keys of a contract each kind reads (besides ``kind``); another known key is refused, not ignored
KIND_KEYS = {"choice": {"label", "choices", "choices_from"}, "json": {"schema"}, "text": {"label"}}
CONTRACT_KEYS = {"kind"}.union(*KIND_KEYS.values())
INPUT_KEYS = {"required", "default", "help"}
INDEX_KEYS = {"preamble", "preamble_file", "template"}
ENTRY_KEYS = {"name", "file", "replaces"}
#: an input is a variable of the template's Jinja text, and a --input KEY / page field: a plain ASCII name
INPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: a template's name is what --template, the index and the page name it by: plain ASCII, so that "mcq " or a name
#: with an invisible or right-to-left character is not a second "mcq" that loads without `replaces = true`
TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NAME_RULE = "a template's name is letters, digits, _ and - (a letter or digit first, at most 64): [A-Za-z0-9][A-Za-z0-9_-]*"
#: names Jinja reads as its own operators and literals: an input so named could not be used in the text
JINJA_WORDS = {"and", "or", "not", "in", "is", "if", "else", "true", "false", "none", "True", "False", "None"}
#: names Jinja gives a meaning of its own: ``self`` (the template; an input so named fails every render), ``loop``
#: (inside a for loop), ``super``, ``caller``, ``varargs`` and ``kwargs`` (inside blocks and macros)
JINJA_NAMES = {"self", "loop", "super", "caller", "varargs", "kwargs"}
#: a template file or index is read whole; anything larger is not one
MAX_FILE_BYTES = 256 * 1024
#: a choice read from an options input needs this many options: one option is no choice
MIN_OPTIONS = 2
#: How a user gives a template its inputs, which the fix of an input error names (``Template.fill``'s ``via``): the
#: CLI's options (``edgemed run``), or the ``template_inputs`` object of a request to ``edgemed serve``. ``input``:
#: the fix for a missing input ``{key}``; ``own``: the inputs given otherwise, by an option of their own (``run
#: --question``; a missing options input's fix is ``options``); ``options``: how to give the options ``{key}`` (the
#: input the contract's ``choices_from`` names), ``own_options``: the options inputs given by an option of their own
#: (``run --options``);
#: ``cut``: how to give a reply cut at its token limit more room (``Template.parse``'s ``truncated``); ``name``: an
#: input as the caller's user names it, ``text``: how to give it as text (on the CLI only --item-json holds other
#: JSON values).
VIA = {
    "cli": {"input": "pass it with -i {key}='...' (or -i {key}=@FILE to read it from a file)", "give": "pass",
            "name": "the input '{key}'", "text": "write it as a JSON string (\"...\") in --item-json",
            "own": {"question": "pass it with --question '...' (or --question @FILE to read it from a file)"},
            "options": "-i {key}='{{\"A\": \"...\", \"B\": \"...\"}}'",
            "own_options": {"options": "--options '{{\"A\": \"...\", \"B\": \"...\"}}'"},
            "cut": "raise max_tokens (--max-tokens)"},
    "api": {"input": "send it in 'template_inputs': {{\"{key}\": ...}}", "give": "send",
            "name": "template_inputs.{key}", "text": "send it as a JSON string: 'template_inputs': {{\"{key}\": \"...\"}}",
            "options": "'template_inputs': {{\"{key}\": {{\"A\": \"...\", \"B\": \"...\"}}}}",
            "cut": "send a larger max_tokens (or max_completion_tokens)"},
}


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

    def fill(self, inputs: dict, via: str = "cli") -> dict:
        """Inputs with defaults applied; unknown or missing inputs are errors that name the template, and whose fix
        says how to give an input the way the caller's user gives them (``via``: a key of ``VIA``)."""
        how = VIA[via]
        table = self.contract.choices_from
        options_like = how.get("own_options", {}).get(table, how["options"]).format(key=table)
        unknown = set(inputs) - set(self.inputs)
        if unknown:
            raise TemplateError(f"Template '{self.name}' has no input {', '.join(sorted(unknown))}.",
                                f"its inputs are: {', '.join(self.inputs)}")
        values = {}
        for key, spec in self.inputs.items():
            given = inputs.get(key)
            if key in inputs and key != self.contract.choices_from:
                given = self._text(key, given, how)
            blank = given is None or (isinstance(given, str) and not given.strip())  # a note of only blank lines
            if not blank:
                values[key] = given
            elif "default" in spec:  # of the type checked at load (``_check_default``)
                values[key] = spec["default"] if key == self.contract.choices_from else _as_text(spec["default"])
            elif spec.get("required", True):
                why = "; the one given is blank" if given is not None else ""
                fix = (f"{how['give']} {options_like}" if key == self.contract.choices_from
                       else how.get("own", {}).get(key, how["input"]).format(key=key))
                raise TemplateError(f"Template '{self.name}' needs the input '{key}' ({spec.get('help', '')}){why}.",
                                    fix)
            else:  # optional, no default: the text renders it empty
                values[key] = ""
        options = values.get(self.contract.choices_from) if self.contract.choices_from else None
        if self.contract.choices_from and options not in (None, "") and not isinstance(options, dict):
            raise TemplateError(f"Template '{self.name}' takes '{self.contract.choices_from}' as an object of labels "
                                f"and answers, not {type(options).__name__} {str(options)[:40]!r}.",
                                f"{how['give']} {options_like}")
        if self.contract.choices_from and len(options or {}) < MIN_OPTIONS:
            raise TemplateError(f"Template '{self.name}' needs at least {MIN_OPTIONS} options in "
                                f"'{self.contract.choices_from}' (got {len(options or {})}): with fewer there is "
                                "nothing to choose between.",
                                f"give two or more, e.g. {options_like}")
        if self.contract.choices_from:
            self._check_labels([str(k) for k in options], options_like)
            values[self.contract.choices_from] = self._option_texts(options, options_like, how)
        return values

    def _text(self, key: str, value, how: dict) -> str:
        """An input given as the text the template renders. An array, an object, true or null (a served request's
        ``template_inputs`` are any JSON, as an --item-json's fields are) rendered as Python's repr ("['a', 'b']",
        "True"), and a 0 or false was dropped by the text's ``{% if %}``."""
        text = _as_text(value)
        if text is None:
            raise TemplateInputError(f"Template '{self.name}': {how['name'].format(key=key)} must be text, not "
                                     f"{_json_kind(value)}.", how["text"].format(key=key), key)
        return text

    def _option_texts(self, options: dict, options_like: str, how: dict) -> dict:
        """Each option's text as text: a blank one ("A": "") had the model choose between empty lines, and null, an
        array or an object rendered as Python's repr ("A. None")."""
        texts = {}
        for label, value in options.items():
            text = _as_text(value)
            if text is None or not text.strip():
                why = "has no text" if text is not None else f"is {_json_kind(value)}, not text"
                raise TemplateInputError(f"Template '{self.name}': the option {str(label)!r} in "
                                         f"{how['name'].format(key=self.contract.choices_from)} {why}, so it is no "
                                         "answer the model can choose.",
                                         f"give each option its text, e.g. {options_like}",
                                         f"{self.contract.choices_from}.{label}")
            texts[label] = text
        return texts

    def _check_labels(self, labels: list[str], options_like: str) -> None:
        """Each option's label is what a reply names it by: none blank, none without a letter or digit (a reply's
        markdown, "**", "_" and "-", would read as that option, and the parse takes a long time over a reply made of
        them), none with spaces around it or a line break or invisible character in it (the answer line is read
        stripped, one line: "A " and "A\nB" could never be the answer), no two that differ only in case or width (the
        answer line is read without regard to case: "Answer: a" is option A; "Ａ" is a full-width "A")."""
        fix = f"label each option with its own letter or number, e.g. {options_like}"
        blank = [label for label in labels if not label.strip()]
        if blank:
            raise TemplateError(f"Template '{self.name}': an option's label is {'empty' if not blank[0] else 'blank'} "
                                f"({blank[0]!r}), so no answer can name it.", fix)
        padded = [label for label in labels if label != label.strip()]
        if padded:
            raise TemplateError(f"Template '{self.name}': the option label {padded[0]!r} has spaces around it, so an "
                                "answer (read without them) cannot name it.", fix)
        hidden = [label for label in labels if any(unicodedata.category(c)[0] == "C" or c in "\u2028\u2029"
                                                   for c in label)]
        if hidden:
            raise TemplateError(f"Template '{self.name}': the option label {hidden[0]!r} holds a line break or an "
                                "invisible character, so an answer line cannot name it (a label is one line of "
                                "visible text).", fix)
        marks = [label for label in labels if not re.search(r"[^\W_]", label)]
        if marks:
            raise TemplateError(f"Template '{self.name}': the option label {marks[0]!r} has no letter or digit, so a "
                                "reply's punctuation or markdown would read as that option.", fix)
        seen: dict[str, str] = {}
        for label in labels:
            other = seen.setdefault(unicodedata.normalize("NFKC", label).casefold(), label)
            if other != label:
                raise TemplateError(f"Template '{self.name}': the options {other!r} and {label!r} differ only in case "
                                    "or width, so an answer cannot tell them apart.", fix)

    def choices(self, inputs: dict, via: str = "cli") -> tuple[str, ...]:
        return self.contract.resolve_choices(self.fill(inputs, via))

    def messages(self, inputs: dict, via: str = "cli") -> list[dict]:
        """System (safety preamble + task + contract) and user messages for ``inputs`` (``via``: as ``fill``)."""
        values = self.fill(inputs, via)
        choices = self.contract.resolve_choices(values)
        where = f"template '{self.name}' ({self.source})"
        task = render(self.system, values, where).strip()
        system = "\n\n".join(p for p in (self.preamble.strip(), task, self.contract.instruction(choices)) if p)
        user = render(self.user, values, where).strip()
        if not user:  # the model would answer nothing in particular, as `run` refuses an empty --prompt for
            raise TemplateError(f"Template '{self.name}': its user message comes out empty for these inputs, so the "
                                "model would be asked nothing.",
                                f"give the inputs its question needs ({', '.join(self.inputs) or 'it has none'}), or "
                                f"fix 'user' in {self.source}")
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def parse(self, reply: str, inputs: dict, started_in_think: bool = False, truncated: bool = False,
              via: str = "cli") -> Parsed:
        """``reply`` read by the contract; ``truncated``: it was cut at its token limit, and is no answer."""
        values = self.fill(inputs, via)
        texts = values.get(self.contract.choices_from) if self.contract.choices_from else None
        return self.contract.parse(reply, self.contract.resolve_choices(values), started_in_think, texts, truncated,
                                   VIA[via]["cut"])


def _load_toml(text: str, source: str) -> dict:
    try:
        return loads_toml(text)
    except ValueError as exc:  # TOMLDecodeError and TooDeep
        raise TemplateError(f"{source}: not valid TOML ({exc}).", f"fix the syntax of {source}") from None


def _as_text(value) -> str | None:
    """A value as the text a template renders: a string, or a number written out (an age of 54); None for anything
    else (an array, an object, true or false, null)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    return None


def _json_kind(value) -> str:
    """A value's JSON type, as a client or an --item-json wrote it."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return {dict: "an object", list: "an array"}.get(type(value), type(value).__name__)


def _kind(value) -> str:
    return {str: "a string", bool: "true or false", dict: "a table", list: "an array"}.get(type(value), type(value).__name__)


def _build(data: dict, source: str, preamble: str) -> Template:
    def fail(field, why, fix=""):
        fix = fix or f"fix '{field}'"
        raise TemplateError(f"{source}: {field}: {why}.", f"{fix} in {source}")

    def want(field, value, kind: type):
        if not isinstance(value, kind):
            fail(field, f"expected {_kind(kind())}, got {_kind(value)}")

    for key in data:
        if key not in TOP_KEYS:
            fail(key, "unknown key")
    for key in REQUIRED:
        if key not in data:
            fail(key, "missing")
    for key in ("name", "title", "system", "user"):
        want(key, data[key], str)
    if not TEMPLATE_NAME.fullmatch(data["name"]):
        fail("name", f"{data['name']!r} is no template name: {NAME_RULE}", "rename the template (and its index entry)")
    if not data["user"].strip():
        fail("user", "empty: the model would be asked nothing", "write the question's layout in 'user'")
    inputs = data.get("inputs", {})
    want("inputs", inputs, dict)
    for name, spec in inputs.items():
        if not INPUT_NAME.fullmatch(name) or name in JINJA_WORDS | JINJA_NAMES:
            fail(f"inputs.{name}", "an input's name is a variable of the template text: letters, digits and _ "
                                   "(not first), at most 64, and not one of Jinja's words (and, or, not, in, is, if, "
                                   "else, true, false, none) or its own names (self, loop, super, caller, varargs, "
                                   "kwargs)", "rename the input (and its uses in the text)")
        if not isinstance(spec, dict) or set(spec) - INPUT_KEYS:
            fail(f"inputs.{name}", "expected a table with required / default / help")
        if "required" in spec:
            want(f"inputs.{name}.required", spec["required"], bool)
        if "help" in spec:
            want(f"inputs.{name}.help", spec["help"], str)
    for key in ("system", "user"):
        problem, name = _undeclared(data[key], set(inputs))
        if problem:
            fail(key, problem)
        if name:
            fail(key, f"uses {{{{ {name} }}}}, which is no input of {data['name']!r} (its inputs: "
                      f"{', '.join(inputs) or 'none'})", f"declare [inputs.{name}] (or correct the name)")
    contract = data["contract"]
    want("contract", contract, dict)
    for key in contract:
        if key not in CONTRACT_KEYS:
            fail(f"contract.{key}", "unknown key")
    if contract.get("kind") not in KINDS:
        fail("contract.kind", f"expected one of {', '.join(KINDS)}, got {contract.get('kind')!r}")
    kind, tpl = contract["kind"], f"template '{data['name']}'"
    for key in contract:
        if key != "kind" and key not in KIND_KEYS[kind]:
            fail(f"contract.{key}", f"{tpl} has a {kind} contract, which does not use '{key}' (it takes "
                                    f"{', '.join(sorted(KIND_KEYS[kind]))})", f"remove '{key}' from [contract]")
    if "label" in contract:
        want("contract.label", contract["label"], str)
        if kind == "choice" and not contract["label"].strip():
            fail("contract.label", f"{tpl}: a choice contract's label opens its answer line ('Answer: B'); an empty "
                                   "one makes any line, a bullet or a word, an answer line",
                 "set label = \"Answer\" (or leave it out)")
    if "choices" in contract and "choices_from" in contract:
        fail("contract.choices_from", f"{tpl} gives both choices and choices_from: one of them would be ignored",
             "keep either choices (a fixed set) or choices_from (an options input)")
    if "choices" in contract:
        want("contract.choices", contract["choices"], list)
        if not all(isinstance(c, str) and c.strip() for c in contract["choices"]):
            fail("contract.choices", "every choice is a non-empty string")
        if marks := [c for c in contract["choices"] if not re.search(r"[^\W_]", c)]:
            fail("contract.choices", f"{tpl}: the choice {marks[0]!r} has no letter or digit, so a reply's "
                                     "punctuation or markdown would read as that choice", "name each choice in words")
        seen: dict[str, str] = {}
        for choice in contract["choices"]:
            if (other := seen.get(choice.casefold())) is not None:
                fail("contract.choices", f"{tpl}: the choices {other!r} and {choice!r} "
                                         f"{'are the same' if other == choice else 'differ only in case'}, so an "
                                         "answer cannot tell them apart (the answer line is read without regard to "
                                         "case)", "list each choice once")
            seen[choice.casefold()] = choice
    if "choices_from" in contract:
        want("contract.choices_from", contract["choices_from"], str)
        if contract["choices_from"] not in inputs:
            fail("contract.choices_from", f"names no input of this template ({', '.join(inputs) or 'it has none'})")
    if contract["kind"] == "choice" and not (contract.get("choices") or contract.get("choices_from")):
        fail("contract.choices", "a choice contract needs choices or choices_from")
    if contract["kind"] == "json" and not isinstance(contract.get("schema"), dict):
        fail("contract.schema", "a json contract needs a schema table")
    if contract["kind"] == "json" and (problem := _schema_problem(contract["schema"])):
        fail(*problem)
    for name, spec in inputs.items():
        if "default" in spec and (why := _default_problem(spec["default"], name == contract.get("choices_from"))):
            fail(f"inputs.{name}.default", why)
    examples = data.get("examples", [])
    want("examples", examples, list)
    for i, example in enumerate(examples):
        want(f"examples[{i}]", example, dict)
    return Template(name=data["name"], title=data["title"], system=data["system"], user=data["user"], inputs=inputs,
                    contract=Contract(kind=contract["kind"], label=contract.get("label", "Answer"),
                                      choices=tuple(contract.get("choices", ())),
                                      choices_from=contract.get("choices_from", ""), schema=contract.get("schema", {})),
                    examples=tuple(data.get("examples", ())), preamble=preamble, source=source)


def _default_problem(default, options: bool) -> str | None:
    """Why ``default`` is no value of its input, or None: text (or a number), as an input given is (``Template.fill``);
    for the options input, a table of option texts. A default of ["a", 1] rendered as Python's repr."""
    if not options:
        return None if _as_text(default) is not None else f"expected a string, got {_kind(default)}"
    if not isinstance(default, dict):
        return f"expected a table of option texts, got {_kind(default)}"
    bad = next((label for label, text in default.items() if not (_as_text(text) or "").strip()), None)
    return None if bad is None else f"the option {bad!r} has no text (expected a non-empty string, got {_kind(default[bad])})"


def _undeclared(source: str, inputs: set[str]) -> tuple[str, str]:
    """(a syntax error, '') or ('', the first variable ``source`` reads that is none of ``inputs``), or ('', '').

    The text is parsed, never rendered (rendering is the sandboxed worker's, ``sandbox.py``), and the tree walked
    here: ``jinja2.meta.find_undeclared_variables`` compiles it, and compiling evaluates constant expressions
    (``"x"|center(300000000)`` builds 300 MB in this process). A name the text sets itself ({% set %}, a for loop's
    target, a macro's argument) counts as declared, wherever it is set; Jinja's own globals (range, dict, ...) and
    names (loop, caller, ...) too. Every other name is an input the renderer must be given: one that no input
    declares failed only at its first use, with a fix (pass --input ward) that the template then refused."""
    import jinja2
    from jinja2 import nodes

    env = jinja2.Environment()  # the prompt flavor's syntax (worker.py): the default delimiters, no extensions
    try:
        tree = env.parse(source)
        names = list(tree.find_all(nodes.Name))
        imported = [n for node in tree.find_all(nodes.FromImport) for n in node.names]
    except jinja2.TemplateSyntaxError as exc:
        return f"a Jinja syntax error at line {exc.lineno}: {str(exc.message).rstrip('.')}", ""
    except RecursionError:
        return "nests its Jinja expressions too deeply to read", ""
    declared = {n.name for n in names if n.ctx in ("store", "param")} | set(env.globals) | JINJA_NAMES | inputs
    declared |= {n[1] if isinstance(n, tuple) else n for n in imported}
    declared |= {node.target for node in tree.find_all(nodes.Import)} | {m.name for m in tree.find_all(nodes.Macro)}
    return "", next((n.name for n in names if n.ctx == "load" and n.name not in declared), "")


def _keyword_problem(key: str, value) -> str | None:
    """Why ``value`` is no ``key`` of a JSON schema that the parse (``_schema_errors``) can check, or None. A string
    where a list belongs was read letter by letter ("intravenous" as an enum took "ven"), a string count made every
    answer a TypeError."""
    if key == "required" and not (isinstance(value, list) and all(isinstance(k, str) for k in value)):
        return f"expected an array of property names, got {_kind(value)} {value!r}"
    if key == "enum" and not isinstance(value, list):
        return f"expected an array of the values allowed, got {_kind(value)} {value!r}"
    if key in ("minItems", "minLength") and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        return f"expected a whole number of at least 0, got {_kind(value)} {value!r}"
    if key == "pattern":
        if not isinstance(value, str):
            return f"expected a regular expression (a string), got {_kind(value)} {value!r}"
        try:
            re.compile(value)
        except re.error as exc:
            return f"{value!r} is no regular expression ({exc})"
    if key in ("properties", "items") and not isinstance(value, dict):
        return f"expected a table (a schema{' per property' if key == 'properties' else ''}), got {_kind(value)}"
    if key == "properties" and (bad := next((k for k, sub in value.items() if not isinstance(sub, dict)), None)):
        return f"the property {bad!r} is {_kind(value[bad])}, not a table (a schema)"
    return None


def _schema_problem(node, where: str = "") -> tuple[str, str] | None:
    """The first problem of a JSON schema (``node``) as (the field, why): a ``type`` that names no JSON type, or a
    keyword the parse checks (required, enum, minItems, minLength, pattern, properties, items) of the wrong shape."""
    if not isinstance(node, dict):
        return None
    if "type" in node:
        kinds = node["type"] if isinstance(node["type"], list) else [node["type"]]
        if not kinds or not all(isinstance(k, str) and k in JSON_TYPES for k in kinds):
            return "contract.schema", (f"type {node['type']!r}{' at ' + where if where else ''} is not a JSON type "
                                       f"(one of {', '.join(JSON_TYPES)}, or a list of them)")
    for key in ("required", "enum", "minItems", "minLength", "pattern", "properties", "items"):
        if key in node and (why := _keyword_problem(key, node[key])):
            return f"contract.schema.{where + '.' if where else ''}{key}", why
    children = []
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(node.get(key), dict):
            children += [(f"{key}.{name}", sub) for name, sub in node[key].items()]
    for key in ("items", "additionalProperties", "not"):
        children.append((key, node.get(key)))
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(node.get(key), list):
            children += [(f"{key}[{i}]", sub) for i, sub in enumerate(node[key])]
    for place, sub in children:
        problem = _schema_problem(sub, f"{where}.{place}" if where else place)
        if problem:
            return problem
    return None


def _check_index(index: dict, where: str) -> None:
    """index.toml's shape: ``preamble`` or ``preamble_file``, and ``[[template]]`` entries of a name and a file
    inside the folder; each problem named with its field."""
    def fail(field, why):
        raise TemplateError(f"{where}: {field}: {why}.", f"fix '{field}' in {where}")

    def file_name(field, value):
        if not isinstance(value, str) or not value.strip():
            fail(field, f"expected a file name, got {_kind(value)}")
        path = PurePosixPath(value)
        if path.is_absolute() or ".." in path.parts or "\\" in value or value.startswith("~"):
            fail(field, f"'{value}' is not a file inside the folder (no absolute path, no '..')")

    for key in index:
        if key not in INDEX_KEYS:
            fail(key, "unknown key")
    if "preamble" in index and not isinstance(index["preamble"], str):
        fail("preamble", f"expected a string, got {_kind(index['preamble'])}")
    if "preamble_file" in index:
        file_name("preamble_file", index["preamble_file"])
    entries = index.get("template", [])
    if not isinstance(entries, list):
        fail("template", f"expected [[template]] entries, got {_kind(entries)}")
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        field = f"template[{i}]"
        if not isinstance(entry, dict):
            fail(field, f"expected a table with name and file, got {_kind(entry)}")
        for key in entry:
            if key not in ENTRY_KEYS:
                fail(f"{field}.{key}", "unknown key")
        if not isinstance(entry.get("name"), str) or not entry["name"].strip():
            fail(f"{field}.name", "missing or not a string")
        if not TEMPLATE_NAME.fullmatch(entry["name"]):
            fail(f"{field}.name", f"{entry['name']!r} is no template name: {NAME_RULE}")
        if entry["name"] in seen:
            fail(f"{field}.name", f"'{entry['name']}' is listed twice")
        seen.add(entry["name"])
        file_name(f"{field}.file", entry.get("file"))
        if not isinstance(entry.get("replaces", False), bool):
            fail(f"{field}.replaces", f"expected true or false, got {_kind(entry['replaces'])}")


def _read_user_file(folder: Path, name: str) -> str:
    """A file of a user's template folder: a regular file (a FIFO or a device would hang or never end), at most
    ``MAX_FILE_BYTES``, UTF-8 (a byte-order mark at the start, which Windows Notepad writes, is dropped: TOML
    refused it as "Invalid statement at line 1, column 1" of a file that looks right in any editor)."""
    path = folder / name
    fix = f"check the template folder {folder}"
    try:
        data = read_at_most(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        raise TemplateError(f"{path}: no such file (index.toml lists it).", f"add the file, or remove it from {folder}/index.toml") from None
    except OSError as exc:  # NotRegular says which kind of file it is
        raise TemplateError(f"{path}: cannot be read ({exc.strerror or exc}).", fix) from None
    except ValueError:
        raise TemplateError(f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB, which no template is.", fix) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{path}: not UTF-8 text (byte {exc.start}).", f"save {path} as UTF-8") from None


def _load_folder(read, label: str, found: dict[str, Template], fallback: str = "") -> str:
    """``read(name) -> text``: one folder with an index.toml listing its template files; returns its preamble.

    A folder that sets no preamble (or a blank one) gets ``fallback``, the shipped safety preamble: a user's
    template is no less a medical answer than a shipped one.

    A name already in ``found`` (shipped, or from an earlier folder) is taken over only where the entry says
    ``replaces = true``: a template that silently stood in for a shipped one would drop that one's instructions
    without anyone having chosen to."""
    index = _load_toml(read("index.toml"), f"{label}/index.toml")
    _check_index(index, f"{label}/index.toml")
    preamble = index.get("preamble", "")
    if "preamble_file" in index:
        where = f"{label}/{index['preamble_file']}"
        preamble = _load_toml(read(index["preamble_file"]), where).get("text", "")
        if not isinstance(preamble, str):
            raise TemplateError(f"{where}: text: expected a string, got {_kind(preamble)}.", f"fix 'text' in {where}")
    if not preamble.strip():
        preamble = fallback
    for i, entry in enumerate(index.get("template", [])):
        source = f"{label}/{entry['file']}"
        tpl = _build(_load_toml(read(entry["file"]), source), source, preamble)
        if tpl.name != entry["name"]:
            raise TemplateError(f"{source}: name: '{tpl.name}' differs from the index entry '{entry['name']}'.",
                                f"make the index and {source} agree")
        replaces = entry.get("replaces", False)
        where = f"{label}/index.toml: template[{i}]"
        if tpl.name in found and not replaces:
            raise TemplateError(f"{where}: '{tpl.name}' is already the name of the template in {found[tpl.name].source}.",
                                "give yours another name, or add `replaces = true` to its entry to use it instead of that one")
        if replaces and tpl.name not in found:
            raise TemplateError(f"{where}: replaces = true, but no template named '{tpl.name}' loads before this folder.",
                                "remove `replaces`, or check the name against `edgemed run --help`")
        found[tpl.name] = tpl
    return preamble


def _user_folder(folder: Path) -> Path:
    """A folder named in ``$EDGEMED_TEMPLATES_DIR``: it must exist and hold an index.toml (a typo in the variable
    would otherwise leave the user's templates out without a word)."""
    fix = f"point ${env.TEMPLATES_VAR} at a folder with an index.toml listing its templates, or take {folder} out of it"
    if not folder.is_dir():
        raise TemplateError(f"Template folder {folder} (from ${env.TEMPLATES_VAR}) "
                            f"{'is not a folder' if folder.exists() else 'does not exist'}.", fix)
    if not (folder / "index.toml").exists():
        raise TemplateError(f"Template folder {folder} (from ${env.TEMPLATES_VAR}) has no index.toml.", fix)
    return folder


def load_templates() -> dict[str, Template]:
    """Every template by name: shipped ones, then each folder in ``$EDGEMED_TEMPLATES_DIR`` in order (with the
    shipped safety preamble where a folder sets none)."""
    found: dict[str, Template] = {}
    shipped = resources.files("edgemed.templates") / "data"
    safety = _load_folder(lambda name: (shipped / name).read_text(encoding="utf-8"), "edgemed/templates/data", found)
    for folder in env.template_dirs():
        folder = _user_folder(folder)
        _load_folder(lambda name, f=folder: _read_user_file(f, name), str(folder), found, fallback=safety)
    return found


def safety_preamble() -> str:
    """The shipped safety preamble: `chat`'s default system message, whatever user folders replace."""
    shipped = resources.files("edgemed.templates") / "data"
    return _load_folder(lambda name: (shipped / name).read_text(encoding="utf-8"), "edgemed/templates/data", {})


def get_template(name: str) -> Template:
    templates = load_templates()
    if name not in templates:
        raise TemplateError(f"No prompt template named '{name}'.",
                            f"choose one of: {', '.join(sorted(templates))} (see `edgemed run --help`)")
    return templates[name]
