"""Stop strings in a streamed text: the incremental matcher releases exactly what the plain search over the whole
text releases, piece by piece, for any split of the text into tokens."""

from __future__ import annotations

import random

from edgemed.runtime.text_stream import TextStream


def reference(pieces: list[str], stop: tuple[str, ...]) -> tuple[list[str], bool]:
    """The plain search: each token, find every stop string in the whole text; hold back the longest tail that
    is a proper prefix of one."""
    text, sent, out = "", 0, []
    for piece in pieces:
        text += piece
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        if hits:
            out.append(text[sent:max(min(hits), sent)])
            return out, True
        held = max((k for s in stop for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
                   default=0)
        end = max(len(text) - held, sent)
        out.append(text[sent:end])
        sent = end
    out.append(text[sent:])
    return out, False


def streamed(pieces: list[str], stop: tuple[str, ...]) -> tuple[list[str], bool]:
    ids = list(range(len(pieces)))
    ts = TextStream(lambda got: "".join(pieces[i] for i in got), stop)
    out = []
    for i in ids:
        out.append(ts.push(i))
        if ts.stopped:
            return out, True
    out.append(ts.flush())
    return out, False


def test_the_matcher_releases_what_the_plain_search_releases():
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 40)))
        stop = tuple("".join(rng.choice("abc ") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(0, 3)))
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert streamed(pieces, stop) == reference(pieces, stop), (pieces, stop)


def test_a_stop_string_split_across_tokens_is_held_then_cut():
    out, stopped = streamed(["Answer: B", "\n\nQ", "uestion"], ("\n\nQuestion",))
    assert stopped and "".join(out) == "Answer: B" and out[1] == ""


def test_text_that_changes_behind_the_last_piece_is_matched_anew():
    """A decoder may rewrite the tail it showed (bytes completed into another character): the match restarts."""
    texts = ["ab", "xbSTO", "xbSTOP"]
    ts = TextStream(lambda ids: texts[len(ids) - 1], ("STOP",))
    assert ts.push(0) == "ab"
    ts.push(1)
    ts.push(2)
    assert ts.stopped
