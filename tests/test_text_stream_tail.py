"""The end of a streamed text: the last token may hold whole characters and then the first bytes of one that never
came. Those whole characters are shown when generation ends; the dangling bytes are not (and a stop string the
whole characters complete still stops the text)."""

from __future__ import annotations

from edgemed.runtime.text_stream import TextStream

DOSE = [b"Dose", b":", b" 5", b" \xc2", b"\xb5", b"g"]  # " \xc2\xb5": a space, then the two bytes of "µ"


def stream(tokens: list[bytes], stop: tuple[str, ...] = ()) -> TextStream:
    """A ``TextStream`` over byte-level tokens, decoded as the llama.cpp ``Detokenizer`` decodes them."""
    return TextStream(lambda ids: b"".join(tokens[i] for i in ids).decode("utf-8", "replace"), stop)


def run(tokens: list[bytes], stop: tuple[str, ...] = ()) -> tuple[str, bool]:
    ts = stream(tokens, stop)
    out = ""
    for i in range(len(tokens)):
        out += ts.push(i)
        if ts.stopped:
            return out, True
    out += ts.flush()
    return out, ts.stopped


def test_a_cut_after_half_a_character_keeps_the_whole_ones_before_it():
    assert run(DOSE[:4]) == ("Dose: 5 ", False)  # the space came in the same token as half of "µ"
    assert run(DOSE) == ("Dose: 5 µg", False)
    assert run(DOSE[:5]) == ("Dose: 5 µ", False)


def test_a_token_of_only_partial_bytes_at_the_end_adds_nothing():
    assert run([b"Dose", b"\xe2\x82"]) == ("Dose", False)  # the first two bytes of "€"


def test_whole_characters_released_at_the_end_still_meet_a_stop_string():
    assert run([b"Dose", b" 5 \xc2"], stop=("5 ",)) == ("Dose ", True)
    assert run([b"Dose", b" 5 \xc2"], stop=(" 5 x",)) == ("Dose 5 ", False)  # a stop prefix held, then released
