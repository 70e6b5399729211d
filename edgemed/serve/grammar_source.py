"""Where a request's grammar came from: the client's ``grammar``, the JSON schema in ``response_format``, the
``parameters`` of the functions a forced tool call (``tool_choice``) may call, or a medical template's contract.

An answer that grammar could not be followed for (no token allowed, one token too costly to follow) and a grammar
the probe refuses are 400s whose ``param`` names that field and whose fix says what to change in it, as OpenAI's
error shape has it: the ``openai`` client and LangChain show ``param`` beside the message. A strict schema holding a
keyword its grammar would drop is refused up front the same way (``strict_refusal``), naming that keyword, and any
schema whose ``pattern`` cannot become a grammar (``pattern_refusal``), and any schema with a bound no value meets
(``bound_refusal``: a minLength above its maxLength).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from edgemed.runtime.batch.options import BAN
from edgemed.serve.api import ApiError

#: what a grammar too costly to follow needs: llama.cpp tracks every parse, and such alternatives multiply them
REPETITION = "so that no alternatives match the same text under a repetition"


@dataclass(frozen=True)
class GrammarSource:
    """The field a request's grammar came from, as a grammar error's ``param`` and fix name it."""

    param: str  # OpenAI's ``param``: the field the client changes
    names: str  # the grammar, as the fix says it ("the JSON schema in 'response_format'")
    instead: str  # how to ask without it ("leave out 'response_format'")
    bans: bool = False  # the request's logit_bias bans tokens (-100) too: a grammar left without a token may be theirs

    def no_token(self, problem: str) -> ApiError:
        """The answer stopped: the grammar (and the bans) left no token the model may write next."""
        bias = " or remove the -100 logit_bias entries on tokens it needs" if self.bans else ""
        return self._error(problem, f"loosen {self.names}{bias}, or {self.instead}", "no_token_allowed")

    def too_costly(self, problem: str) -> ApiError:
        """The answer stopped: following the grammar took too long for one token."""
        return self._error(problem, f"change {self.names} {REPETITION}, or {self.instead}", "grammar_too_costly")

    def refused(self, exc) -> ApiError:
        """The probe refused the grammar (``grammar_probe.GrammarRefused``): too costly, a crash, or a parse error."""
        if exc.parser_fix is None:
            fix = f"change {self.names} {REPETITION}"
        elif self.param == GRAMMAR.param:  # the client's own GBNF: the parser's advice is for it
            fix = f"correct {self.names} ({exc.parser_fix})"
        else:  # a grammar made from a schema: the schema is what the client changes
            fix = f"simplify {self.names}"
        return self._error(exc.problem, f"{fix}, or {self.instead}", None)

    def _error(self, problem: str, fix: str, code: str | None) -> ApiError:
        return ApiError(400, f"{problem} Fix: {fix}.", "invalid_request_error", code, param=self.param)


GRAMMAR = GrammarSource("grammar", "the grammar in 'grammar'", "leave out 'grammar'")
RESPONSE_FORMAT = GrammarSource("response_format", "the JSON schema in 'response_format'", "leave out 'response_format'")


def forced_call(names: list[str], where: dict[str, int], instead: str | None = None) -> GrammarSource:
    """A forced tool call to one of the functions ``names`` (``where``: each one's index in ``tools``); ``instead``:
    how to ask without the grammar, when that is not ``tool_choice: auto`` (a strict function's grammar under it)."""
    instead = instead or "let the model choose whether to call ('tool_choice': 'auto')"
    if len(names) == 1:
        return GrammarSource(f"tools.{where[names[0]]}.function.parameters",
                             f"the 'parameters' schema of the function '{names[0]}' in 'tools'", instead)
    return GrammarSource("tools", "the functions' 'parameters' schemas in 'tools'", instead)


def template(name: str) -> GrammarSource:
    """A medical template's JSON contract (the request sent neither ``grammar`` nor ``response_format``)."""
    return GrammarSource("template", f"the contract of the template '{name}'", "send 'messages' instead of 'template'")


def strict_refusal(schema, param: str, names: str) -> ApiError | None:
    """The 400 for a strict schema (OpenAI's ``strict: true``) holding keywords its grammar drops
    (``schema_check.unenforced``): the answer could break them, where the client asked for one that cannot. ``param``:
    where the schema sits in the request; ``names``: the schema, as the message says it."""
    from edgemed.runtime.schema_check import unenforced

    dropped = unenforced(schema) if isinstance(schema, dict) else []
    if not dropped:
        return None
    where = [f"{path}.{key}" if path else key for path, key in dropped]
    more = f" (also {', '.join(where[1:6])}{', ...' if len(where) > 6 else ''})" if len(where) > 1 else ""
    return ApiError(400, f"{names} is strict, but its '{where[0]}'{more} cannot be enforced while sampling, so the "
                         "answer could break it. Fix: drop those keywords and check the values client-side, or send "
                         "it with 'strict': false: the answer is then checked against the whole schema after "
                         "generation, and its 'edgemed.schema' says whether it matches.",
                    code="unsupported_schema_keyword", param=f"{param}.{where[0]}")


def pattern_refusal(schema, param: str, names: str) -> ApiError | None:
    """The 400 for a schema whose ``pattern`` no grammar enforces (``schema_check.for_grammar``: ``\\b``, ``\\D``, a
    back reference, a character JSON writes escaped, a count above ``MAX_SCHEMA_COUNT``), strict or not: its grammar
    would force text that cannot match (or not be written at all), where a dropped keyword only leaves the value
    unchecked. ``param`` and ``names`` as for ``strict_refusal``."""
    from edgemed.runtime.schema_check import PatternError, for_grammar

    try:
        for_grammar(schema)
    except PatternError as exc:
        return ApiError(400, f"{names} has a 'pattern' at '{exc.path}' holding {exc.construct}, which cannot become "
                             f"a grammar: {exc.reason}. Fix: {exc.fix}.",
                        code="unsupported_schema_pattern", param=f"{param}.{exc.path}")
    return None


def bound_refusal(schema, param: str, names: str) -> ApiError | None:
    """The 400 for a schema with a bound no value meets (``schema_bounds.contradiction``: a minLength above its
    maxLength, minimum above maximum, an empty enum, a const outside its type), strict or not, before its grammar is
    written: the converter takes it silently, and every answer breaks it. ``param`` and ``names`` as for
    ``strict_refusal``."""
    from edgemed.runtime.schema_bounds import contradiction, shown

    bound = contradiction(schema) if isinstance(schema, dict) else None
    if bound is None:
        return None
    where = f"at '{shown(bound.path)}'" if bound.path else "at its root"
    return ApiError(400, f"{names} cannot be met {where}: {bound.problem}, so no answer could match it. Fix: "
                         f"{bound.fix}.", code="unsatisfiable_schema", param=f"{param}.{bound.at}")


def with_bans(source: GrammarSource | None, body) -> GrammarSource | None:
    """``source`` knowing whether ``body``'s logit_bias bans tokens too."""
    if source is None:
        return None
    return dataclasses.replace(source, bans=any(v <= BAN for v in (body.logit_bias or {}).values()))
