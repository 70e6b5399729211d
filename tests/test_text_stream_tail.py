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


def test_a_stop_string_only_the_final_flush_finds_ends_the_answer_as_stop(smollm2_gguf, monkeypatch):
    """A token that completes a stop string and ends in part of a character is not scanned by ``push``; when
    ``max_tokens`` came next, the flush cut the text at the stop string, and the answer still said ``length``."""
    import edgemed.runtime.text_stream as text_stream
    from edgemed.runtime.batch.batcher import Batcher
    from edgemed.runtime.engine import GenerationSettings, LoadSettings

    real = text_stream.TextStream.flush

    def flush(self):  # as the flush does on " mg\xc2" with stop "mg": the text cut there, stopped
        rest = real(self)
        self.stopped = True
        return rest

    monkeypatch.setattr(text_stream.TextStream, "flush", flush)
    with Batcher(smollm2_gguf, LoadSettings(n_ctx=512, n_threads=1), slots=1, prefix_cache=False) as b:
        items = list(b.submit("Name one vitamin.", GenerationSettings(max_tokens=2, temperature=0.0, stop=("zz",)),
                              request_id="flush-stop"))
    assert items[-1].finish_reason == "stop", items[-1]
