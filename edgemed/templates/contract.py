"""Output contracts: what a template asks the model to end with, and how the reply is parsed.

Three kinds, one row each in ``KINDS``:
* ``choice`` — a line that starts ``Answer: B``, from a fixed set (options' letters, or yes/no/maybe);
* ``json``   — one JSON object matching a schema; engines that support grammars enforce it while sampling;
* ``text``   — free text (the whole reply, thinking removed), optionally after a label.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field

from edgemed.formats.nesting import loads_json
from edgemed.templates.think import CLOSE, strip_think


@dataclass(frozen=True)
class Parsed:
    ok: bool
    value: object          # the choice, the JSON object, or the text
    answer_text: str       # the reply with thinking removed
    error: str = ""
    labelled: bool = False  # a choice found on an answer line ('Answer: X' at a line's start), not a bare reply


@dataclass(frozen=True)
class Contract:
    kind: str
    label: str = "Answer"
    choices: tuple[str, ...] = ()       # fixed choices (yes/no/maybe)
    choices_from: str = ""              # or: the keys of this input (an options table)
    schema: dict = field(default_factory=dict)

    def resolve_choices(self, inputs: dict) -> tuple[str, ...]:
        if self.choices_from:
            return tuple(str(k) for k in inputs.get(self.choices_from, {}))
        return self.choices

    def instruction(self, choices: tuple[str, ...]) -> str:
        return KINDS[self.kind][0](self, choices)

    def parse(self, reply: str, choices: tuple[str, ...], started_in_think: bool = False,
              texts: dict | None = None, truncated: bool = False, cut_fix: str = "raise the token limit") -> Parsed:
        """``texts``: each choice's text (an options table), to recognise a reply that restates one option.
        ``truncated``: the reply was cut at its token limit (finish reason ``length``); whatever it holds is no answer,
        as its end (a correction, the rest of a dose, the closing brace) is missing. ``cut_fix``: how the caller's
        user raises that limit (``library.VIA``'s ``cut``: the CLI's option, or the request's field)."""
        text = strip_think(reply, started_in_think)
        if text == reply.strip() and CLOSE in text:  # no thinking marked, and a closing tag: the chat template
            text = text[text.index(CLOSE) + len(CLOSE):].strip()  # opened the thinking, unannounced; it ends there
        if truncated:
            return Parsed(False, None, text, "the reply was cut at the token limit before it ended, so its answer "
                                             f"may be incomplete: {cut_fix} and ask again")
        return KINDS[self.kind][1](self, text, choices, texts)

    def json_schema(self) -> str | None:
        """JSON text for engines that constrain sampling (``GenerationSettings.json_schema``). A pattern that is not
        anchored (``^...$``), as JSON Schema's search for one ("\\S": not blank), is left out: llama-cpp-python turns
        only anchored ones into a grammar, and the parse checks it on the answer (``_schema_errors``)."""
        return json.dumps(_for_grammar(self.schema)) if self.kind == "json" else None


def _for_grammar(node):
    """``node`` (a JSON schema, or a part of one) without the unanchored patterns of its string nodes."""
    if isinstance(node, list):
        return [_for_grammar(v) for v in node]
    if not isinstance(node, dict):
        return node
    pattern = node.get("pattern")
    searched = isinstance(pattern, str) and not (pattern.startswith("^") and pattern.endswith("$"))
    return {k: _for_grammar(v) for k, v in node.items() if not (k == "pattern" and searched)}


def choice_grammar(choices: tuple[str, ...]) -> str:
    """A GBNF grammar that accepts exactly one of ``choices`` (used to ask again when a reply has no answer line)."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


# -- choice -----------------------------------------------------------------------------
def _choice_instruction(c: Contract, choices) -> str:
    return (f"End your reply with a final line of the form '{c.label}: X', where X is exactly one of: "
            f"{', '.join(choices)}.")


#: what may open an answer line before its label: markdown emphasis, a heading, a quote, a list bullet
_LEAD = r"[ \t>#*_+\-]*"
#: the only words that may come before the label on its line ("Final answer:", "So the correct answer is"); a line
#: such as "Wrong answer: A" or "A common wrong answer: B" is not the answer line
_DISCOURSE = r"(?:(?:so|thus|therefore|hence|overall|in\s+conclusion|in\s+summary)\s*,?\s+)?"
_ADJ = (r"(?:(?:final|correct|best|right|single\s+best|most\s+likely|revised|updated|corrected|amended|real|actual|"
        r"true)\s+){0,2}")
_PREFIX = rf"{_DISCOURSE}(?:(?:the|my|our)\s+)?{_ADJ}"
#: before "the answer is" only ("Based on the above, the answer is C", "I think the answer is C"): a short clause of at
#: most eight words that ends in a comma and states no condition ("If the patient were a child, the answer is D" is
#: no answer), and/or the model's own "I think"; reported speech ("Many would say the answer is B") is prose
_CLAUSE = (r"(?!(?:if|unless|when|whenever|whether|otherwise|without|in\s+case)\b)[^\W\d_][\w'\u2019\-]*"
           r"(?:[ \t]+[\w'\u2019\-]+){0,7}[ \t]*,[ \t]*")
_FIRST_PERSON = (r"(?:I|we)[ \t]+(?:(?:still|now|would)[ \t]+)?(?:think|believe|feel|say|conclude|am[ \t]+"
                 r"(?:fairly[ \t]+|quite[ \t]+)?(?:confident|sure))[ \t]+(?:that[ \t]+)?")
_LEAD_IN = rf"(?:(?:{_CLAUSE})(?:{_FIRST_PERSON})?|{_DISCOURSE}{_FIRST_PERSON})"
#: after "the answer is": an option ruled out ("The answer is not A: ..."), no answer and no competing one either
_RULED_OUT = re.compile(r"[ \t\*_]*(?:(?:definitely|certainly|clearly|surely|obviously|probably)[ \t]+)?"
                        r"(?:not|never|neither|unlikely)\b", re.I)
#: what opens a reply's second line when its first line restated an option only to reject it
_REJECTED = re.compile(r"[ \t>#*_\-]*(?:incorrect|wrong|false|unlikely|not\b|no\b[ \t]*[.,:;!\-\u2013\u2014]|"
                       r"this\s+is\s+(?:incorrect|wrong|not)\b|ruled\s+out|eliminated?\b)", re.I)
_DECO = r"[ \t\*\(\[\"'_]*"  # markdown bold, brackets, quotes around the choice
#: after the choice on its line: a correction ("No, wait - yes", "yes. No, wait") makes the line no answer
_CORRECTION = re.compile(r"[\s,;:.!\-\u2013\u2014]*(?:(?:no|oh|oops)[ \t]*[,.;:!\-\u2013\u2014][ \t]*)?"
                         r"(?:wait|actually|sorry|hmm+|or\s+rather|rather)\b", re.I)
#: words that offer another choice beside the answer: "C (or possibly D)", "C, or maybe D", "maybe yes"
_HEDGE_WORD = r"(?:or|and|possibly|maybe|perhaps|probably|also|alternatively|otherwise|either|consider(?:ing)?)\b"
_SEP = r"[\s\(\)\[\]\*_\"']*"          # what may stand between the answer and a hedge: brackets, emphasis, quotes
_SEP_LIST = r"[\s\(\)\[\]\*_\"',/&]*"  # ... and between the words of a hedge
#: after the choice: a reason ("C because ..."), which may run on in lower case
_REASON = re.compile(r"[\s,;:\(\-\u2013\u2014]*(?:because|since|as|given|due\s+to|owing\s+to)\b", re.I)
#: what says another choice X is (also) the answer, anywhere on the answer line: "D is also possible", "B could be
#: correct", "B is also a reasonable choice" (not "B is a distractor", "B is the most common wrong answer")
_OK = r"(?:possible|correct|right|plausible|valid|acceptable|reasonable|likely|good|best)"
_ALSO = (r"[\s\*_\)\]\"']*(?:(?:is|are|seems|could|might|may|would|can)[ \t]+)?(?:(?:also|possibly|equally|perhaps|"
         rf"too)[ \t]+)?(?:be[ \t]+)?(?:also[ \t]+)?(?:(?:a|an|the)[ \t]+)?(?:(?:very|quite|{_OK})[ \t]+)?"
         rf"(?:{_OK}|answer|option|alternative|choice|possibility)\b")
#: ... and what offers X as the answer: "it could be D", "might also be D" (not "cannot be D", "could not be D")
_COULD_BE = r"\b(?:could|might|may)[ \t]+(?:(?:also|equally|well)[ \t]+)?be[\s\*\(\[\"'_:]*"

#: What names a second choice X after the answer: a correction or a second answer anywhere below it (``_SECOND``), an
#: alternative under a condition on the answer's line or in the sentence after it (``_ALTERNATIVE``). Any of them makes
#: the reply no answer, so ``run`` asks again; a reply that only discusses another option ("B is wrong because ...",
#: "not C", "A, B and D are less likely", "pernicious anaemia (B) in vegans") names none. ``{x}`` stands for the
#: choices other than the answer, ``{any}`` for every choice. Each pattern has one unbounded run per place it starts:
#: the reply is untrusted text (see _BOX).
#: X ends its clause ("Actually, D.", "it is D, because"), not a list ("No, A, B and D are wrong")
_ENDS = r"(?=[ \t\*_\)\]\"']*(?:$|[.;!?:]|,(?![ \t]*(?:and[ \t]+|or[ \t]+)?(?:{any})\b)))"
#: ... and after a correction, where a question or a label does not end it: "Wait, D? No." asks and rejects, and "A: No.
#: B: No." labels each option
_ENDS_STATED = _ENDS.replace("[.;!?:]", "[.;!]")
_ENDS_SAID = _ENDS.replace("[.;!?:]", "[.;!:]")  # after "Therefore," a label still ends it: "Bottom line: no."
#: where a sentence starts: a line's start, or after a stop (one blank: a run of them is read by what follows)
_SENTENCE_START = r"(?:^|[.;!?][ \t])[ \t>\*_\-]*"
_COND = r"(?:in|if|when|whenever|during|among|unless|once|where|otherwise|depending)\b"
_SECOND = (
    # a correction, then X alone or said to be the answer: "No, D.", "Actually, D", "Correction: the answer is D",
    # "Revised answer: D", "Wait, ... it's D"
    r"\b(?:no[ \t]*[,.;:!\-\u2013\u2014]|(?:wait|actually|sorry|oops|hmm+|correction|scratch[ \t]+that|on[ \t]+second"
    r"[ \t]+thoughts?|on[ \t]+reflection|i[ \t]+meant?|or[ \t]+rather|rather|revised|updated|corrected|amended|edit|"
    r"update)\b)[ \t,;:.!\*_\-\u2013\u2014]*(?:(?:(?:the|my)[ \t]+)?(?:[a-z]+[ \t]+){0,2}answer(?:[ \t]+(?:is|should"
    r"[ \t]+be|must[ \t]+be|would[ \t]+be)|[ \t\*_]*:)[ \t\*_:\"'(]*|it(?:'s|\u2019s|[ \t]+is|[ \t]+(?:should|must|"
    r"would)[ \t]+be)[ \t\*_:\"'(]*)?"
    rf"(?:{{x}})\b(?:{_ENDS_STATED}|{_ALSO})",
    # a second answer: "the real answer is D", "the answer should be D", "so the answer is D", "it is D." (after
    # "the answer is not C;"), "D is the correct answer.", "give D instead", "I change my answer to D"
    r"\b(?:(?:the|my)[ \t]+(?:(?:real|actual|true|revised|updated|corrected|amended)[ \t]+)+answer[ \t]+(?:is|should"
    r"[ \t]+be|must[ \t]+be)|(?:so|thus|therefore|hence)[ \t,]+(?:the|my)[ \t]+answer[ \t]+is|(?:the|my)[ \t]+"
    r"(?:[a-z]+[ \t]+){0,2}answer[ \t]+(?:should|must)[ \t]+be)(?:[ \t]+(?:actually|really|instead))?"
    r"[ \t\*_:\"'(]*(?:{x})\b",
    rf"\bit(?:'s|\u2019s|[ \t]+is)[ \t]+(?:(?:actually|really)[ \t]+)?(?:{{x}}){_ENDS}",
    r"(?:^|[.;!?][ \t])[ \t>\*_\-]*(?:option[ \t]+)?(?:{x})\b[ \t\*_\)\]\"']*(?:is|was)[ \t]+"
    r"(?:(?:actually|really|also)[ \t]+)?(?:the[ \t]+)?(?:(?:correct|right|best|real|actual|true|final)[ \t]+)?"
    r"(?:answer|correct|right)\b",
    r"(?:{x})[ \t\*_,]+(?:instead|actually)\b",
    r"\b(?:chang(?:e|ing)|switch(?:ing)?)[ \t]+(?:my[ \t]+)?(?:answer[ \t]+)?to[ \t\*_:\"'(]*(?:{x})\b",
    # a sentence that gives X as the answer or as the conclusion: "I apologize for the confusion. The correct answer
    # is D.", "However, the answer would be D", "Therefore, D.", "Bottom line: no.", "Nope, D.", "Yes, in fact." (not
    # "The most common wrong answer is D", nor a question, "So, D? No.")
    _SENTENCE_START + r"(?:(?:however|but|so|thus|therefore|hence|overall|instead|in[ \t]+fact)[ \t,]+)?(?:the|my)"
    r"[ \t]+(?:(?!(?:wrong|incorrect|false|tempting|common|popular|obvious|naive|trap)\b)[a-z]+[ \t]+){0,2}answer"
    r"[ \t]+(?:is|would[ \t]+be)[ \t\*_:\"'(]*(?:{x})\b",
    _SENTENCE_START + r"(?:therefore|thus|hence|so|overall|in[ \t]+summary|in[ \t]+conclusion|in[ \t]+fact|bottom"
    r"[ \t]+line|conclusion|to[ \t]+conclude|alternatively|nope|apologies|my[ \t]+mistake)\b[ \t,:\-\u2013\u2014]*"
    rf"(?:{{x}}){_ENDS_SAID}",
    _SENTENCE_START + rf"(?:{{x}})[ \t\*_,]+in[ \t]+fact{_ENDS_SAID}",
    # X said to be right too: "However, D is also correct.", "Both C and D are correct.", "It could also be D."
    _SENTENCE_START + r"(?:(?:however|but|though|alternatively|both)[ \t,]+)?(?:option[ \t]+)?(?:(?:{any})[ \t,]+"
    rf"(?:and|&)[ \t]+(?:option[ \t]+)?)?(?:{{x}})\b{_ALSO}",
    rf"\b(?:it|this|that)[ \t]+{_COULD_BE}(?:{{x}}){_ENDS_STATED}",
    # X alone as a sentence, or a line of its own, after the answer: "No. Yes.", "C. D." (not the answer to a question,
    # "Safety concerns? Yes.", nor an item of a bulleted list, "Eliminated options:\n- A\n- D")
    r"(?:^(?![ \t]*[-+*][ \t])|[.;!][ \t])[ \t>\*_\-]*(?:{x})[ \t\*_\"'\)\]]*(?:[.!][ \t\*_]*)?$",
)
#: An alternative under a condition: "C (D in pregnancy)", "C; but D if pregnant", "but D for children", "if not, no",
#: "otherwise no", "In pregnancy, D.". Read on the answer's line and in the sentence after it only: further on, an
#: explanation compares and qualifies ("Compare pernicious anaemia (B) in vegans"). A bracket holds the condition
#: with X ("(D in pregnancy)"); "(B) in vegans" is a label.
_ALTERNATIVE = (
    r"(?:[\(\[,;:\-\u2013\u2014]|\b(?:but|though|although|except|unless)\b)[ \t\*_\"']*"
    rf"(?:(?:but|then|and|use|give|choose)[ \t]+)?(?:{{x}})[ \t\*_\"']*{_COND}",
    r"\bbut[ \t]+(?:{x})[ \t\*_\"'\)\]]*(?:for|with|without|after|before|under|over)\b",
    r"\b(?:otherwise|else|if[ \t]+not)\b[ \t,:\*_\"']*(?:{x})\b",
    rf"\b{_COND}[^.;\n]{{0,80}}[,:][ \t\*_\"']*(?:(?:then|use|give|prefer|choose)[ \t]+|(?:the[ \t]+)?answer[ \t]+"
    rf"(?:is|would[ \t]+be|should[ \t]+be)[ \t\*_:\"'(]*)?(?:{{x}}){_ENDS}",
)
#: ... on the answer's line only: "C; for children, D" (below it, "For bone health, D." names a purpose)
_ALTERNATIVE_LINE = (rf"\bfor\b[^.;\n]{{0,80}},[ \t\*_\"']*(?:{{x}}){_ENDS}",)
#: ... and, for words (yes / no / maybe), X opening a sentence of its own on the answer's line: "Answer: yes. No, the
#: trial ..." (below it, "Yes, there was a trend" is part of the explanation)
_SECOND_WORD = r"[.;!?][ \t]+(?:{x})[ \t]*[,:!\-\u2013\u2014]"
#: after an option's text on the answer line: another option's joined to it ("Metformin or Insulin"), ...
_JOINED = re.compile(r"[ \t]*(?:[,/&+]|\b(?:or|and|plus|vs\.?|versus)\b)[ \t]*")
#: ... in the rest of its clause, what rules that option out ("Surgery is not indicated", "Vitamin D deficiency would
#: cause rickets instead", "surgery is reserved for ..."), or in its sentence what sets it against the answer's own text
#: ("Vitamin A deficiency causes night blindness, whereas vitamin C deficiency ...")
_RULED_OUT_IN = re.compile(r"\b(?:not|never|neither|nor|instead|reserved|unlikely|incorrect|wrong)\b|n['\u2019]t\b")
_CONTRAST = re.compile(r"\b(?:whereas|while|unlike|but|in[ \t]+contrast|by[ \t]+contrast)\b")
_CLAUSE_END = re.compile(r"[,;:.!?()\[\]\n]")
_SENTENCE_END = re.compile(r"[;.!?()\[\]\n]")
#: the sentence that opens a line (up to its first stop)
_SENTENCE = re.compile(r"[\s.!?]*[^.!?]*[.!?]*")
#: what follows an option's text that ends its clause: the end, or a stop, a comma or a bracket that no letter or
#: digit follows at once ("2 mg." and "2, 4", not "2.5 mg")
_TEXT_ENDS = re.compile(r"[ \t]*(?:$|[.;:!?,\)\]](?!\w))")


#: LaTeX's \boxed{X} (R1-Distill's way of marking its final answer). The body is one group with no ambiguity (a
#: character that is no brace, or one brace pair with no braces inside), whitespace is stripped in Python: a reply
#: is untrusted text, and nested optional whitespace runs backtrack without end on a long one.
_BOX = r"\\boxed\s*\{(?P<in>(?:[^{}]|\{[^{}]*\})*)\}"
_MATH_OPEN, _MATH_CLOSE = r"(?:\$\$?|\\\(|\\\[)", r"(?:\$\$?|\\\)|\\\])"
_BOXED_LINE = re.compile(rf"[\s\*_]*(?:{_MATH_OPEN}\s*)?{_BOX}(?:\s*{_MATH_CLOSE})?[\s\*_\.]*")
_BOXED_INLINE = re.compile(rf"(?:{_MATH_OPEN}[ \t]*)?{_BOX}(?:[ \t]*{_MATH_CLOSE})?")
_BOX_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")


def _box_content(m: re.Match) -> str | None:
    """What a box holds, a \\text{...} around it taken off; None for anything else with braces in it."""
    inner = m.group("in").strip()
    wrapped = _BOX_WRAP.fullmatch(inner)
    if wrapped:
        return wrapped.group(1).strip()
    return None if "{" in inner else inner


def _unboxed(text: str, label: str) -> str:
    """``text`` with LaTeX boxes read as plain answers: a line that is one box ("\\boxed{C}", "$\\boxed{C}$") becomes
    an answer line ("Answer: C"), a box inside a line becomes its content ("the answer is \\boxed{C}." -> "the answer
    is C."), and display-math fences on lines of their own ("\\[", "\\]", "$$") are dropped. A box holding more
    LaTeX than a \\text{...} is left as it is (no answer)."""
    if "boxed" not in text:
        return text
    out = []
    for line in text.splitlines():
        if line.strip() in ("\\[", "\\]", "$$"):
            continue
        m = _BOXED_LINE.fullmatch(line)
        if m and (inner := _box_content(m)) is not None:
            out.append(f"{label}: {inner}")
            continue
        out.append(_BOXED_INLINE.sub(lambda b: b.group(0) if (inner := _box_content(b)) is None else inner, line))
    return "\n".join(out)


def _norm(text: str) -> str:
    """An option's text as a reply restating it is compared: no emphasis, no final stop, case and spaces folded."""
    return " ".join(re.sub(r"[\*_`]", " ", text).strip().rstrip(".!").split()).casefold()


def _parse_choice(c: Contract, text: str, choices, texts: dict | None = None) -> Parsed:
    """The choice of the reply's answer lines: a line that starts (after markdown marks) with the label ('Answer:',
    'Final answer:', 'The correct answer is', 'Based on the above, the answer is'). Every such line must give the same
    one choice; a line that rules an option out ('The answer is not A') gives none. A choice only inferred from prose
    or from a list of the options ("A. ...", "1. ...") is no answer (``ask`` then asks for the label). A reply that is
    nothing but one choice ("B", "**maybe**"), or whose first line states one option ("**C. Vitamin C**", "C is the
    answer."), is that choice unless an answer line disagrees."""
    text = _unboxed(text, c.label)
    alts = "|".join(re.escape(x) for x in sorted(choices, key=len, reverse=True))
    single = all(len(x) == 1 for x in choices)
    # Single-letter choices are matched case-sensitively in prose: "the answer is a ..." is an article.
    upper = all(len(x) == 1 and x.isupper() for x in choices)
    strict = f"(?-i:{alts})" if upper else alts
    # "Yes, no adverse events were seen": after a comma, "no" opening prose (a determiner) is no other choice; "no in
    # children", "no depending on ...", "no, ..." still are (word choices only)
    prose_no = "" if single else (r"(?!,[ \t]*no[ \t]+(?!(?:in|for|among|with|when|if|at|on|depending|otherwise|or|and|"
                                  r"but|unless|except)\b)[^\W\d_])")
    arrow = r"->|=>|[\u2192\u21d2\u27f6]"
    offer = (r"(?:or|possibly|maybe|perhaps|probably|alternatively|otherwise|else|if[ \t]+not|less[ \t]+likely|"
             r"second[ \t\-]+(?:choice|best|option|most[ \t]+likely)|next[ \t]+best|vs|versus)\b")
    filler = r"(?:or|possibly|maybe|perhaps|probably|also|else|even|likely|option|choice|answer)\b"
    # after "/", "|" or "either", a choice stands alone: no label of a list ("C (Vitamin C) | A: night blindness, B:
    # ...") and no subject of prose ("C (Vitamin C) / A and B are wrong", "Either A or B would be incorrect", "yes
    # (...) / no harm seen"), as ``worded`` reads a lower-case letter; "C | D possibly" and "C / D in pregnancy" (a
    # condition, as ``_ALTERNATIVE`` reads one) still offer D
    apart = r"(?:either\b|[/|])"
    standing = rf"(?![ \t]*:|[ \t]+(?!(?:possibly|maybe|perhaps|probably)\b|{_COND})[^\W\d_])"

    def hedges(found: str) -> tuple[re.Pattern, re.Pattern, re.Pattern]:
        """``hedge`` and ``offered`` for the answer ``found``: each looks for a choice other than it offered beside it.
        The answer named again is no second choice: "C (C)", "C (Vitamin C), or option C", "yes (...), probably yes";
        but the answer named again and then another choice offered is a hedge as it would be without it: "C (C or D)",
        "C (C/D)", "C (C, but possibly D)". ``disowned`` looks for the answer itself said to be wrong on its line: "C
        (C and D are both wrong)", "C (not C)" contradict it. Another option ruled out is no hedge: "C (not D)", "C (C,
        since D is wrong)" explain why the answer is C."""
        others = "|".join(re.escape(x) for x in sorted(choices, key=len, reverse=True) if x != found) or r"(?!)"
        same = f"(?-i:{re.escape(found)})" if upper else re.escape(found)
        again = rf"(?:{_SEP}(?:{same})\b(?![\-\u2013\u2014]\w))?"  # the answer named again first: "C (C or D)"
        # another choice offered right after the answer: "A or B", "B (or C)", "C (possibly D)", "C. Perhaps D", "maybe
        # yes", "C -> D". After "or", ",", "/" and the like, letters are read in their case, as ``offered`` reads them:
        # "C, or a mild variant of it" holds the article, not option A. A lower-case letter no word follows is still a
        # choice ("C, or d", "c/d"). The answer itself may stand among the words before the other: "C (either C or D)".
        # A "/" or "|" written tight joins two choices whatever follows ("C/D", "yes/no depending on the dose", "C/D:
        # both fit"); with a blank beside it, the choice after it stands alone, as ``offered`` reads it: "C / A and B
        # are wrong" is prose, "C / D" and "C / d" are hedges
        worded = rf"(?-i:{others})|(?:{others})(?![ \t]+[^\W\d_])" if upper else others
        words = rf"(?:{_SEP_LIST}(?:{_HEDGE_WORD}|(?:{same})\b))*{_SEP_LIST}"
        hedge = re.compile(rf"{again}(?:{_SEP}(?:{prose_no}[,&]|{arrow}|(?:[;:.\-\u2013\u2014]{_SEP})?{_HEDGE_WORD})"
                           rf"{words}(?:{worded})\b"
                           rf"|[\*_\)\]\"']*[/|](?![ \t]){words}(?:{worded})\b"  # "C/D"
                           rf"|{_SEP}[/|]{words}(?:{others})\b{standing}"  # "C / D"
                           rf"|[ \t]+(?:{others})\b"  # "maybe yes"
                           rf"|[ \t\*_]*[\(\[][ \t\*_\"']*(?:{others})[ \t\*_\"'.!?]*[\)\]])", re.I)  # "C (D)"
        # ... and a few words on: a second choice after a word that offers it as an alternative ("or", "possibly",
        # "maybe", "less likely", "second choice", "vs", "/", "|"; after "but" or "though" too, and after a short aside
        # on the answer), with "option" or "choice" before it, or a choice in brackets with such a word after it: "C
        # (or option D)", "C, but possibly D", "C; less likely D", "C (second choice: D)", "C|D", "C (70%) or D", "C (D
        # possibly)". The choice is read as ``worded`` reads it: "C, but possibly a mild case" is prose, "C (70%) or d"
        # a hedge. After "/", "|" or "either" it stands alone, in either case (``apart``, ``standing``).
        then = rf"(?:[\s\*_\"'\(\[,:.]*{filler})*[\s\*_\"'\(\[,:]*"
        offered = re.compile(rf"{again}(?:(?:[ \t\*_]*[\(\[][^\(\)\[\]\n]{{0,40}}[\)\]])?"
                             rf"[\s\*_\"'\(\[,;:.\-\u2013\u2014]*(?:(?:but|though|although|yet|and)\b[\s,]*)?"
                             rf"(?:{offer}{then}(?:{worded})\b|{apart}{then}(?:{others})\b{standing})"
                             rf"|[ \t\*_]*[\(\[][ \t\*_\"']*(?:{worded})[ \t\*_\"']*"
                             r"(?:(?:possibly|maybe|perhaps|probably)\b|\?)[ \t\*_\"'.!?]*[\)\]])", re.I)
        # the answer said to be wrong: as a subject, alone or in a short list of choices ("C is wrong", "both C and D
        # are incorrect", "A and C are ruled out"), or after "not" opening a bracket or a clause ("C (not C)")
        joint = r"(?:[ \t]*,[ \t]*(?:(?:and|&)[ \t]+)?|[ \t]+(?:and|&)[ \t]+)(?:option[ \t]+)?"
        member = rf"(?:{strict})\b[ \t\*_\"'\)\]]*"
        itself = rf"(?:{same})\b(?![\-\u2013\u2014]\w)"
        disowned = re.compile(
            rf"(?:^|[\(\[,;:/.!?\-\u2013\u2014]|\b(?:and|but|though|although|while|whereas)\b)[ \t\*_\"']*"
            rf"(?:both[ \t]+)?(?:option[ \t]+)?(?:{member}{joint}){{0,4}}{itself}[ \t\*_\"'\)\]]*"
            rf"(?:{joint}{member}){{0,4}}"
            r"(?:is|are|was|were|seems?|looks?)[ \t]+(?:(?:both|all|also|clearly|definitely|certainly|obviously|"
            r"probably|likely|actually|equally)[ \t]+)*(?:wrong|incorrect|false|not[ \t]+(?:correct|right|the[ \t]+"
            r"answer)|ruled[ \t]+out|excluded|eliminated|unlikely(?![ \t]+to\b))\b"
            rf"|[\(\[,;:\-\u2013\u2014][ \t\*_\"']*(?:but[ \t]+)?not[ \t]+(?:option[ \t]+)?{itself}", re.I)
        return hedge, offered, disowned

    label = re.escape(c.label)
    line_re = re.compile(rf"{_LEAD}(?:{_PREFIX}{label}(?:[ \t\*_]*[:\-]|\s+(?P<is>is)\b[ \t]*:?|[ \t\*_]*$)"
                         rf"|{_LEAD_IN}(?:the|my|our)\s+{_ADJ}{label}\s+(?P<lead_is>is)\b[ \t]*:?)(?P<rest>.*)", re.I)

    def canonical(found: str) -> str | None:
        # the choice the pattern matched, as the pattern matched it: re.I folds more than str.lower ("ſ" is "s")
        return next((x for x in choices if re.fullmatch(re.escape(x), found, flags=re.I)), None)

    def bare(line: str) -> str | None:
        """``line`` is one choice and nothing else ("B", "**maybe**.")."""
        m = re.fullmatch(rf"{_DECO}({strict})[\s\*\)\]\"'_\.\!]*", line.strip(), flags=re.I)
        return canonical(m.group(1)) if m else None

    def listed(line: str) -> re.Match | None:
        """``line`` opens like an option in a list: "C. ...", "(B) ...", "A: ..."."""
        return re.match(rf"{_DECO}({strict})\s*[\)\.\:]", line.strip(), flags=re.I)

    def restated(line: str) -> str | None:
        """``line`` restates one option whole ("C. Vitamin C")."""
        m = re.fullmatch(rf"{_DECO}({strict})\s*[\)\.\:]\s*(.+)", line.strip(), flags=re.I)
        found = canonical(m.group(1)) if m else None
        if found is not None and texts and _norm(str(texts.get(found, ""))) == _norm(m.group(2)) != "":
            return found
        return None

    def whole(line: str) -> str | None:
        """``line`` is one choice and nothing else, or one option restated."""
        return bare(line) or restated(line)

    def stated(line: str) -> str | None:
        """``line`` states one option: restated whole ("**C. Vitamin C**"), or said to be the answer ("C is the
        answer.", "C. Vitamin C is the answer."); a bare choice alone is not enough on a first line."""
        line = line.strip().rstrip(" \t*_.!")
        cut = max(0, len(line) - 80)  # the phrase is short: look only at the line's end, however long the line
        said = re.search(r"(?<![^\s\*_])is\s+the\s+(?:(?:correct|right|best|final)\s+)?answer$", line[cut:], flags=re.I)
        return whole(line[:cut + said.start()]) if said else restated(line)

    # each option's text as a reply restates it, longest first: "Vitamin B12" before a "Vitamin B" beside it
    known = sorted(((x, t) for x in choices if texts and (t := _norm(str(texts.get(x, ""))))),
                   key=lambda pair: len(pair[1]), reverse=True)

    def opens(said: str, t: str) -> bool:
        return said.startswith(t) and not said[len(t):len(t) + 1].isalnum()

    def clash(tail: str, found: str) -> str | None:
        """The other option whose text opens ``tail``, what follows the choice ``found`` ("B. Vitamin C", "B (Vitamin
        C)", "**B** - Vitamin C deficiency ...": option C's text), or that is joined to this option's own ("A.
        Metformin or Insulin"), if any. Not one whose text opens this option's own and runs on ("B. Aspirin +
        clopidogrel" for B "Aspirin plus clopidogrel" beside A "Aspirin", where "B. Aspirin" is a clash), nor a number
        that runs on ("B. 2 tablets of 2 mg = 4 mg" beside A "2"): working towards this option, not the name of the
        other. Nor one ruled out in its clause ("D. Surgery is not indicated", "(surgery is reserved for ...)") or set
        against this option's text ("C. Vitamin A deficiency causes ..., whereas vitamin C deficiency ...")."""
        said = _norm(tail.lstrip(" \t*_.,;:()[]\"'-\u2013\u2014"))
        own = _norm(str(texts.get(found, ""))) if texts else ""
        for x, t in known:  # longest first: this option's own text before a shorter one it opens with
            if not opens(said, t):
                continue
            after = said[len(t):]
            if x == found:
                joined = _JOINED.match(after)
                return next((y for y, u in known if y != found and joined and opens(after[joined.end():], u)), None)
            if (own and opens(own, t) and after.strip(" .,;:!?)]\"'")) or (
                    t[0].isdigit() and not _TEXT_ENDS.match(said, len(t))):
                return None
            clause, sentence = _CLAUSE_END.split(after, 1)[0], _SENTENCE_END.split(after, 1)[0]
            contrast = _CONTRAST.search(sentence)
            if _RULED_OUT_IN.search(clause) or (own and contrast and re.search(
                    rf"(?<!\w){re.escape(own)}(?!\w)", sentence[contrast.end():])):
                return None
            return x
        return None

    def value(rest: str, is_form: bool) -> str | None:
        """The choice that opens ``rest`` (what follows the label on its line), or None when it is no clean answer:
        prose ("a patient"), a hedge ("A or B", "C (possibly D)"), a correction ("No, wait - yes"), a mark over it
        ("C̸"), another choice said to be the answer too ("C; D is also possible"), the answer itself said to be wrong
        ("C (C and D are both wrong)"), another option's text after the letter ("B. Vitamin C")."""
        m = re.match(rf"{_DECO}(?:option[ \t]+{_DECO})?({strict if is_form else alts})\b", rest, flags=re.I)
        found = canonical(m.group(1)) if m else None
        if found is None:
            return None
        tail = rest[m.end():]
        if tail and unicodedata.category(tail[0]).startswith("M"):  # a combining mark: struck or slashed
            return None
        hedge, offered, disowned = hedges(found)
        if hedge.match(tail) or offered.match(tail) or _CORRECTION.match(tail):
            return None
        if disowned.search(tail):  # "C (C and D are both wrong)": the line contradicts its own answer
            return None
        if clash(tail, found) is not None:  # the letter says one option, the text another
            return None
        others = [re.escape(x) for x in choices if x != found]
        other = (f"(?-i:{'|'.join(others)})" if upper else "|".join(others)) if others else r"(?!)"
        if re.search(rf"\b(?:answer\s+(?:is|would\s+be|should\s+be|must\s+be)[\s\*\(\[\"'_:]*(?:{other})\b"
                     rf"|{_COULD_BE}(?:{other})\b|(?:{other})\b{_ALSO})", tail, flags=re.I):
            return None  # "C because the answer is D in infants", "C; D is also possible", "C, but it could be D"
        if _REASON.match(tail):  # "C because the deficiency ...": a reason, in lower case as it may be
            return found
        if single and (not is_form or found.islower()) and re.match(r"[ \t]+(?-i:[a-z])", tail):
            return None  # "Answer: a patient ..." is prose, not option A
        if not single and re.match(r"[ \t]+\w", tail) and re.search(rf"\b(?:{other})\b", tail, flags=re.I):
            return None  # "no longer recommended? Maybe.": the choice word runs on into prose that names another
        return found

    def named(rest: str) -> set[str]:
        """The choices an unclear answer line names ("not B", "A or B")."""
        return {x for x in (canonical(f) for f in re.findall(rf"\b({strict})\b", rest, flags=re.I)) if x}

    def second(after: list[str], span: int, answer: str) -> str | None:
        """The other choice that ``after`` (the reply's lines from its answer on, the answer taking ``span`` of them)
        names as a correction or a second answer (``_SECOND``), or as an alternative under a condition on the answer's
        line or in the sentence after it (``_ALTERNATIVE``), if any. Below an answer that is itself 'maybe', a yes
        and a no under conditions are the mixed evidence it means ("In women, yes; in men, no.")."""
        others = [re.escape(x) for x in choices if x != answer]
        if not others:
            return None
        other = f"(?-i:{'|'.join(others)})" if upper else "|".join(others)
        line = "\n".join(after[:span])
        mixed = answer.casefold() == "maybe" or bool(texts) and _norm(str(texts.get(answer, ""))) == "maybe"
        near = line if mixed or len(after) <= span else f"{line}\n{_SENTENCE.match(after[span]).group(0)}"
        where = ([("\n".join(after), p) for p in _SECOND] + [(near, p) for p in _ALTERNATIVE]
                 + [(line, p) for p in _ALTERNATIVE_LINE + (() if single else (_SECOND_WORD,))])
        for part, pattern in where:
            said = re.search(pattern.replace("{x}", f"(?P<x>{other})").replace("{any}", strict), part, re.I | re.M)
            if said:
                return canonical(said.group("x"))
        return None

    lines = [line for line in text.splitlines() if line.strip()]
    given: list[str] = []        # the choice of each clear answer line
    mentioned: set[str] = set()  # the choices unclear answer lines name
    unclear = 0                  # answer lines that give no one choice
    start = None                 # the first clear answer line
    span = 1                     # ... and the lines it takes ("Answer:" alone, then the choice: two)
    for i, line in enumerate(lines):
        m = line_re.match(line)
        if not m:
            continue
        rest = m.group("rest")
        is_form = m.group("is") is not None or m.group("lead_is") is not None
        if is_form and _RULED_OUT.match(rest):
            continue  # "The answer is not A: ...": an option ruled out, no answer line
        if rest.strip(" \t*_"):
            found = value(rest, is_form)
        else:  # "Answer:" or "**Final answer**" alone: the choice is the next line, whole
            rest = lines[i + 1] if i + 1 < len(lines) else ""
            found = whole(rest)
        if found:
            given.append(found)
            if start is None:
                start, span = i, 1 if m.group("rest").strip(" \t*_") else 2
        else:
            mentioned |= named(rest)
            unclear += 1
    first = None  # the option the first line states, when the reply does not go through the options
    if len(lines) > 1 and not (unclear and not given):
        first = stated(lines[0])
        if first is not None and (_REJECTED.match(lines[1]) or any(
                (o := listed(line)) and canonical(o.group(1)) != first for line in lines[1:])):
            first = None  # "**A. Vitamin A**\n\nIncorrect: ...", or the options gone through one by one
    # a first line that is a choice alone is no answer by itself, but one that differs from the answer lines is a
    # second answer: "**C**\n\nAnswer: D", "Yes.\n\nAnswer: no"
    alone = bare(lines[0]) if given and first is None and len(lines) > 1 and not line_re.match(lines[0]) else None
    if given or first:
        answers = set(given) | mentioned | ({first} if first else set()) | ({alone} if alone else set())
        if len(answers) == 1:
            answer = answers.pop()
            other = second(lines if first else lines[start:], 1 if first else span, answer)
            if other is None:
                return Parsed(True, answer, text, labelled=bool(given))
            return Parsed(False, None, text, f"the reply names {other} after its answer {answer} (a correction, a "
                                             "second answer or an alternative under a condition): no single answer")
        where = f"first line and its '{c.label}:' lines" if first or alone else f"'{c.label}:' lines"
        return Parsed(False, None, text, f"the reply's {where} disagree ({', '.join(sorted(answers))}): "
                                         "no single answer")
    if "\n" not in text.strip():
        found = whole(text) or stated(text)
        if found is not None:
            return Parsed(True, found, text)
    if unclear:
        return Parsed(False, None, text, f"the '{c.label}:' line gives no single one of {', '.join(choices)} "
                                         "(a hedge, a negation, the answer said to be wrong, a correction, another "
                                         "option's text after the letter, "
                                         "or prose)")
    return Parsed(False, None, text, f"no '{c.label}: X' line with X in {', '.join(choices)}")


# -- json -------------------------------------------------------------------------------
def _json_instruction(c: Contract, choices) -> str:
    return ("Reply with one JSON object only (no prose before or after it) that matches this JSON schema:\n"
            + json.dumps(c.schema, separators=(",", ":")))


#: the JSON types a schema's ``type`` names (one, or a list of them), as the parsed reply holds them
JSON_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool,
              "null": type(None)}


def _schema_types(schema: dict) -> list:
    """The types a schema node allows: ``type = "number"`` or ``type = ["number", "null"]``; none when it says none."""
    kind = schema.get("type")
    return [kind] if isinstance(kind, str) else list(kind) if isinstance(kind, list) else []


def _is_type(value, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):  # Python's True is an int; JSON's true is no number
        return False
    return isinstance(value, JSON_TYPES[kind])


def _schema_errors(schema: dict, value, path: str = "$") -> list[str]:
    """A small JSON-schema check (type, required, enum, properties, additionalProperties: false, items, minItems,
    minLength, pattern): what llama.cpp's grammar enforces, and a pattern it may not (``Contract.json_schema``). A
    pattern is searched for in the string, as JSON Schema says, with Python's ``re``."""
    kinds = _schema_types(schema)
    # a type that is no JSON type is refused when the template loads; here it is no answer, never a crash
    unknown = [k for k in kinds if not (isinstance(k, str) and k in JSON_TYPES)]
    if unknown:
        return [f"{path}: the schema's type {unknown[0]!r} is none of {', '.join(JSON_TYPES)}"]
    if kinds and not any(_is_type(value, k) for k in kinds):
        return [f"{path}: expected {' or '.join(kinds)}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "object" in kinds and isinstance(value, dict):
        errors += [f"{path}.{k}: missing" for k in schema.get("required", []) if k not in value]
        properties = schema.get("properties", {})
        properties = properties if isinstance(properties, dict) else {}
        for k, sub in properties.items():
            if k in value and isinstance(sub, dict):
                errors += _schema_errors(sub, value[k], f"{path}.{k}")
        if schema.get("additionalProperties") is False:  # "urgency " beside "urgency" is no key of the schema
            errors += [f"{path}: unexpected key {k!r}" for k in value if k not in properties]
    least, pattern = schema.get("minLength", 0), schema.get("pattern")
    if "string" in kinds and isinstance(value, str) and isinstance(least, int) and len(value) < least:
        errors.append(f"{path}: shorter than {least} characters" if value else f"{path}: empty")
    elif isinstance(value, str) and isinstance(pattern, str):
        try:
            if not re.search(pattern, value):
                errors.append(f"{path}: does not match the pattern {pattern!r}")
        except re.error:  # a template's mistake: no answer, never a crash
            errors.append(f"{path}: the schema's pattern {pattern!r} is no regular expression")
    if "array" in kinds and isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        items = schema.get("items", {})
        for i, item in enumerate(value):
            errors += _schema_errors(items, item, f"{path}[{i}]") if isinstance(items, dict) else []
    return errors


def _repeated_keys(text: str) -> str:
    """The first key an object of ``text`` (valid JSON, depth already checked) names twice, or ''."""
    repeated: list[str] = []

    def pairs(items):
        seen: set[str] = set()
        for key, _ in items:
            if key in seen:
                repeated.append(key)
            seen.add(key)
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return repeated[0] if repeated else ""


#: one markdown code fence around the whole reply, the only thing the object may come in: "```json\n{...}\n```", with
#: Windows line ends, or on one line ("```json {...} ```")
_FENCE = re.compile(r"```[ \t]*[\w.+-]*[ \t]*(?:\r?\n|(?=\{))(?P<body>(?:(?!```).)*)```", re.S)
_BOM = "\ufeff"  # a byte order mark some models and tools put before the text


def _parse_json(c: Contract, text: str, choices, texts=None) -> Parsed:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return Parsed(False, None, text, "no JSON object in the reply")
    reply = text.strip().lstrip(_BOM).strip()
    fenced = _FENCE.fullmatch(reply)
    body = (fenced.group("body") if fenced else reply).strip().lstrip(_BOM).strip()
    if not (body.startswith("{") and body.endswith("}")):  # "On second thought this is an emergency: ..." after it
        return Parsed(False, None, text, "prose outside the JSON object: the reply must be the object alone, and "
                                         "what is outside it may contradict it")
    try:
        value = loads_json(body, finite=True)
    except ValueError as exc:  # JSONDecodeError, TooDeep, and NaN or 1e999 (no JSON, and json.dumps would write it)
        return Parsed(False, None, text, f"invalid JSON: {exc}")
    twice = _repeated_keys(body)
    if twice:  # json keeps the last of them: '"urgency": "emergency", ..., "urgency": "routine"' would read as routine
        return Parsed(False, None, text, f"the JSON object gives '{twice}' more than once")
    errors = _schema_errors(c.schema, value)
    return Parsed(not errors, value, text, "; ".join(errors))


# -- text -------------------------------------------------------------------------------
def _text_instruction(c: Contract, choices) -> str:
    return f"Begin your reply with '{c.label}:'." if c.label else ""


def _parse_text(c: Contract, text: str, choices, texts=None) -> Parsed:
    body = text
    if c.label:  # the label that opens the reply; one further on is part of the answer ("the usual answer: ...")
        m = re.match(rf"[ \t>#*_]*{re.escape(c.label)}[ \t*_]*:[ \t*_]*", text, flags=re.I)
        body = text[m.end():] if m else text
    body = body.strip()
    return Parsed(bool(body), body, text, "" if body else "empty reply")


# kind -> (instruction, parser)
KINDS = {
    "choice": (_choice_instruction, _parse_choice),
    "json": (_json_instruction, _parse_json),
    "text": (_text_instruction, _parse_text),
}
