"""A request whose own constraints leave no token (a grammar nothing can continue, or one whose every next token
its logit_bias bans) ends alone with ``refused``; llama.cpp would otherwise pick a banned token and its grammar
would abort the whole server. A grammar llama.cpp rejects never reaches stderr (request text)."""

from __future__ import annotations

import pytest

from edgemed.errors import InputError
from edgemed.runtime.engine import GenerationSettings, LoadSettings

pytest.importorskip("llama_cpp")

from edgemed.runtime.batch.batcher import Batcher  # noqa: E402
from serve_kit import collect  # noqa: E402
from edgemed.runtime.batch.options import Extras  # noqa: E402

NOTHING = 'root ::= [^\\x00-\\U0010FFFF]'  # a character class that excludes every character


@pytest.fixture(scope="module")
def batcher(smollm2_gguf):
    b = Batcher(smollm2_gguf, LoadSettings(n_ctx=2 * 256, n_threads=1), slots=2, queue_size=2)
    b.start()
    yield b
    b.close()


def test_a_grammar_nothing_can_continue_ends_that_request_alone(batcher):
    prompt = batcher.render_chat([{"role": "user", "content": "Name one vitamin."}])
    other = batcher.submit(prompt, GenerationSettings(max_tokens=8), request_id="ok")
    stuck = batcher.submit(prompt, GenerationSettings(max_tokens=8, grammar=NOTHING), request_id="stuck")
    text, done = collect(stuck)
    assert (text, done.finish_reason) == ("", "refused")
    assert "No token is allowed" in done.error and done.fix.startswith("remove the -100 logit_bias")
    assert collect(other)[1].finish_reason == "length"
    assert batcher.stats()["finished_total"]["refused"] == 1
    assert collect(batcher.submit(prompt, GenerationSettings(max_tokens=4), request_id="after"))[1].finish_reason == "length"


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_logit_bias_banning_every_token_the_grammar_allows_is_refused(batcher, temperature):
    """``root ::= "x"`` allows one token, and the request bans it: greedy and a seeded draw alike end refused."""
    prompt = batcher.render_chat([{"role": "user", "content": "Say x."}])
    x = batcher.tokenize("x", add_special=False, parse_special=False)
    assert len(x) == 1
    settings = GenerationSettings(max_tokens=4, grammar='root ::= "x"', temperature=temperature, seed=3)
    _, done = collect(batcher.submit(prompt, settings, request_id="banned", extras=Extras(logit_bias=((x[0], -100.0),))))
    assert done.finish_reason == "refused"
    text, done = collect(batcher.submit(prompt, settings, request_id="allowed", extras=Extras(logit_bias=((x[0], 5.0),))))
    assert (text, done.finish_reason) == ("x", "stop")


def test_a_grammar_llama_cpp_rejects_is_an_input_error_and_never_printed(smollm2_gguf, capfd):
    """llama.cpp's grammar parser prints the grammar it rejects, whole, with fprintf(stderr): request text."""
    from edgemed.runtime.llamacpp import Model, SamplerChain

    model = Model(smollm2_gguf, LoadSettings(n_ctx=256, n_threads=1))
    try:
        capfd.readouterr()
        with pytest.raises(InputError, match="grammar does not parse"):
            SamplerChain(model, GenerationSettings(grammar='root ::= "Patient Jane Roe, MRN 4417" ('))
        captured = capfd.readouterr()
        assert "Jane Roe" not in captured.err + captured.out
        SamplerChain(model, GenerationSettings(grammar='root ::= "yes" | "no"')).close()  # a good one still parses
    finally:
        model.close()


def test_the_candidate_record_matches_the_bindings_struct_field_by_field():
    import ctypes
    import types

    import llama_cpp

    from edgemed.runtime.llamacpp import _token_data_dtype

    assert _token_data_dtype(llama_cpp).itemsize == ctypes.sizeof(llama_cpp.llama_token_data)

    class Moved(ctypes.Structure):  # a binding whose struct gained a field before the logit
        _fields_ = [("id", ctypes.c_int32), ("flags", ctypes.c_int32), ("logit", ctypes.c_float),
                    ("p", ctypes.c_float)]

    with pytest.raises(RuntimeError, match="llama_token_data is laid out as"):
        _token_data_dtype(types.SimpleNamespace(llama_token_data=Moved))
