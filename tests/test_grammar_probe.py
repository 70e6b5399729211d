"""The grammar probe (``runtime.grammar_probe``): a new grammar is tried in a worker process holding only the
vocabulary, before the server's own process parses it. The costly cases themselves, through the server, are in
``test_serve_hostile.py``; here: verdicts kept, a worker that crashes, one that cannot start, one busy, closing."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

pytest.importorskip("llama_cpp")

from edgemed.errors import InputError  # noqa: E402
from edgemed.runtime import grammar_probe  # noqa: E402
from edgemed.runtime.grammar_probe import GrammarProbe, ProbeBusy, ProbeUnavailable  # noqa: E402

AMBIGUOUS = "root ::= (" + " | ".join(["[a-z ]+"] * 12) + ")*"


def fake_worker(tmp_path, body: str):
    """A stand-in for ``python``: a shell script run as ``SCRIPT -m edgemed.runtime.grammar_probe MODEL TOKENS``."""
    script = tmp_path / "worker.sh"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return SimpleNamespace(executable=str(script))


def test_a_cheap_grammar_passes_a_costly_one_is_refused_and_both_verdicts_are_kept(smollm2_gguf):
    probe = GrammarProbe(smollm2_gguf)
    try:
        probe.check('root ::= "yes" | "no"')
        with pytest.raises(InputError, match="took longer than") as e:
            probe.check(AMBIGUOUS)
        assert "repetition" in e.value.fix
        asked = []  # every grammar put to the worker from here on
        real_probe = probe._probe
        probe._probe = lambda gbnf: asked.append(gbnf) or real_probe(gbnf)
        probe.check('root ::= "yes" | "no"')
        with pytest.raises(InputError, match="took longer than"):
            probe.check(AMBIGUOUS)
        assert asked == [] and probe.probes == 2  # from the verdicts, no worker call
    finally:
        probe.close()


def test_a_grammar_llama_cpp_rejects_gets_its_own_fix(smollm2_gguf):
    probe = GrammarProbe(smollm2_gguf)
    try:
        with pytest.raises(InputError, match="does not parse") as e:
            probe.check("root ::= (")
        assert "GBNF syntax" in e.value.fix
        assert not e.value.problem.endswith("..")
    finally:
        probe.close()


def test_a_grammar_that_ends_the_worker_is_refused_and_the_next_one_gets_a_fresh_worker(smollm2_gguf, tmp_path,
                                                                                        monkeypatch):
    """What a parser crash looks like from outside: the worker ends mid-probe. The request is refused, the
    server's own process never parsed the grammar, and the next new grammar starts a new worker."""
    monkeypatch.setattr(grammar_probe, "sys", fake_worker(tmp_path, 'echo \'{"ready": true}\'\nread line\nexit 139\n'))
    probe = GrammarProbe(smollm2_gguf)
    try:
        with pytest.raises(InputError, match="crashed the grammar parser"):
            probe.check('root ::= "a"')
        monkeypatch.undo()
        probe.check('root ::= "b"')  # a new worker, the real one
    finally:
        probe.close()


def test_a_worker_that_cannot_start_is_the_servers_503_not_the_clients_400(smollm2_gguf, tmp_path, monkeypatch,
                                                                            caplog):
    monkeypatch.setattr(grammar_probe, "sys", fake_worker(tmp_path, "exit 3\n"))
    probe = GrammarProbe(smollm2_gguf)
    with caplog.at_level("ERROR"), pytest.raises(ProbeUnavailable) as e:
        probe.check('root ::= "a"')
    assert "could not start" in e.value.problem and "exit code 3" in e.value.problem
    assert any("exit code 3" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(grammar_probe, "sys", SimpleNamespace(executable=str(tmp_path / "no-such-python")))
    with pytest.raises(ProbeUnavailable, match="did not start"):
        probe.check('root ::= "a"')


def test_a_new_grammar_waits_for_the_busy_worker_at_most_a_while_a_known_one_not_at_all(smollm2_gguf, monkeypatch):
    monkeypatch.setattr(grammar_probe, "BUSY_WAIT_S", 0.2)
    probe = GrammarProbe(smollm2_gguf)
    try:
        probe.check('root ::= "known"')
        assert probe._probing.acquire()  # another request's new grammar holds the worker
        try:
            with pytest.raises(ProbeBusy) as e:
                probe.check('root ::= "new"')
            assert e.value.retry_after > 0
            done = threading.Event()
            threading.Thread(target=lambda: (probe.check('root ::= "known"'), done.set())).start()
            assert done.wait(1)  # a verdict does not wait for the worker
        finally:
            probe._probing.release()
    finally:
        probe.close()


def test_after_close_no_worker_starts(smollm2_gguf):
    probe = GrammarProbe(smollm2_gguf)
    probe.check('root ::= "a"')
    worker = probe._proc
    probe.close()
    assert worker.poll() is not None
    with pytest.raises(ProbeUnavailable, match="shutting down"):
        probe.check('root ::= "b"')
    assert probe._proc is None
