"""``edgemed bench`` and a clinic's own text: prompts from ``--prompts`` and the questions of an ``--eval`` file are
health information. Nothing of their text is written under the report folder (results, raw results, records, task
files, report, plots): the settings name a file's prompts by sha256 and count, the child gets their text on its stdin,
generated replies are dropped unless ``--keep-replies`` asks for them (then the records are owner-only). The timing
key still follows the prompts, and a key of the earlier shape (the prompts' text in its digest) is never matched."""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from edgemed.benchmarks.harness import runner
from edgemed.benchmarks.harness.child import RAW_SCHEMA
from edgemed.benchmarks.harness.configs import DEFAULT_PROMPTS, Config, Settings, prompts_digest, public_settings

MARKER = "PHI-MARKER-7f3a9c"
PROMPTS = [f"{MARKER} Jane Roe, 58, has had chest pain since Monday; what first?",
           f"{MARKER} John Doe, 71, on warfarin, INR 6.2 and no bleeding: what now?"]
QUESTION = {"id": "clinic-1", "question": f"{MARKER} Which drug lowers LDL cholesterol?",
            "options": {"A": "Insulin", "B": "Aspirin", "C": "Warfarin", "D": "Statin"}, "answer_idx": "D"}


def _settings(tmp_path: Path, name: str, text: str, **kw) -> Settings:
    from edgemed.cli.bench import _settings as cli_settings

    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    args = dict(prompts=path, runs=1, warmup=0, max_tokens=4, threads=1, profile=None, n_ctx=256, evals=None,
                eval_data=None, eval_n=None, eval_context=False, eval_score="logits", eval_threads=None, seed=0,
                scenario="single-stream")
    return cli_settings(**(args | kw))


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_a_clinics_prompts_and_eval_items_leave_no_text_in_the_report_folder(smollm2_gguf, tmp_path):
    """The reviewer's run (``bench run MODEL --prompts FILE --phases timing ...``) with an eval file too, on the real
    SmolLM2-135M: the marker in the prompts and in the eval question is in no file under OUT, nor in what the command
    printed; task files are gone; what an earlier edgemed left there (a task file, a raw result with the prompts'
    text, records with replies) is swept or made public. ~15 s."""
    pytest.importorskip("llama_cpp")
    for module in ("matplotlib", "psutil", "tqdm"):
        pytest.importorskip(module, reason=f"`edgemed bench` needs its extra ({module}): pip install 'edgemed[bench]'")
    from click.testing import CliRunner

    from edgemed.cli import cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    qa = tmp_path / "clinic-qa.jsonl"
    qa.write_text(json.dumps(QUESTION) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    # what a run of an earlier edgemed, killed or not, left in the folder: each holds a clinic's text
    (out / "raw" / "tasks").mkdir(parents=True)
    (out / "raw" / "tasks" / "old-timing.task.json").write_text(json.dumps({"settings": {"prompts": PROMPTS}}))
    (out / "raw" / "old-divergence.json").write_text(json.dumps(
        {"schema": RAW_SCHEMA, "phase": "divergence", "key": {"k": 1}, "settings": {"runs": 1, "prompts": PROMPTS},
         "result": {}}))
    (out / "raw" / "old-accuracy.records.jsonl").write_text(json.dumps({"meta": {"version": 6}}) + "\n" + json.dumps(
        {"id": "clinic-qa:clinic-1", "gen_pred": "D", "reply": f"{MARKER} ... Answer: D"}) + "\n")

    result = CliRunner().invoke(cli, [
        "bench", "run", str(smollm2_gguf), "--prompts", str(prompts), "--phases", "timing,accuracy", "--runs", "2",
        "--warmup", "0", "--max-tokens", "4", "--threads", "1", "--ctx", "256", "--eval", str(qa), "--eval-n", "1",
        "--eval-score", "both", "-o", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert MARKER not in result.output
    results = json.loads(result.stdout)
    assert results["failed"] == []

    files = _files(out)
    timed = out / "raw" / f"{smollm2_gguf.stem}-timing.json"
    records = out / "raw" / f"{smollm2_gguf.stem}-accuracy.records.jsonl"
    assert {p.name for p in files} >= {"results.json", "report.md", "results.csv", timed.name, records.name}
    leaks = [str(p.relative_to(out)) for p in files if MARKER.encode() in p.read_bytes()]
    assert leaks == []
    assert list((out / "raw" / "tasks").iterdir()) == []  # each child's task file removed, the old one swept
    assert json.loads((out / "raw" / "old-divergence.json").read_text())["key"] == {"k": 1}  # made public, kept
    old = [json.loads(line) for line in (out / "raw" / "old-accuracy.records.jsonl").read_text().splitlines()]
    assert old[1]["gen_pred"] == "D" and old[1]["reply"] is None  # the score kept, the reply's text taken out

    s = results["settings"]
    assert "prompts" not in s and s["prompts_source"] == "file" and s["n_prompts"] == 2
    assert s["prompts_sha256"] == prompts_digest(PROMPTS) == hashlib.sha256(
        json.dumps(PROMPTS, ensure_ascii=False).encode("utf-8")).hexdigest()  # of the list, not of the file's bytes
    e, = results["configs"]
    assert len(e["prompt_tokens"]) == 2 and all(n > 10 for n in e["prompt_tokens"])  # each prompt's length, measured
    raw = json.loads(timed.read_text())
    assert raw["settings"] == s
    assert all("tokens" not in r and len(r["tokens_sha256"]) == 64 for r in raw["result"]["runs"])  # no answer ids
    item, = [json.loads(line) for line in records.read_text().splitlines()][1:]
    assert item["id"] == "clinic-qa:clinic-1" and len(item["item_sha"]) == 16 and item["reply"] is None
    assert item["parsed_ok"] is not None and item["gen_tokens"] > 0  # a reply was generated and scored, not kept
    assert e["accuracy"]["n"] == 1 and e["accuracy"]["n_gen"] == 1


def test_the_timing_key_follows_the_prompts_not_their_file(tmp_path):
    """The prompts' digest is of the list: one changed word changes the timing key, the same prompts as .txt or
    .jsonl do not; the other phases' keys do not depend on the prompts. A key whose digest held the prompts' text
    (the earlier shape) is another key: what it measured is measured again, not taken."""
    a = _settings(tmp_path, "a.txt", "\n".join(PROMPTS) + "\n")
    b = _settings(tmp_path, "b.txt", "\n".join(PROMPTS).replace("chest", "abdominal") + "\n")
    jsonl = _settings(tmp_path, "a.jsonl", "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert a.digest("timing") != b.digest("timing") and a.prompts_sha256 != b.prompts_sha256
    assert a.digest("timing") == jsonl.digest("timing") and a.prompts_sha256 == jsonl.prompts_sha256
    for phase in ("accuracy", "divergence"):
        assert a.digest(phase) == b.digest(phase)
    earlier = hashlib.sha256(json.dumps({"runs": 1, "warmup": 0, "max_tokens": 4, "prompts": PROMPTS, "threads": 1,
                                         "n_ctx": 256, "scenario": "single-stream", "seed": 0},
                                        sort_keys=True).encode()).hexdigest()
    assert a.digest("timing") != earlier

    gguf = tmp_path / "q4_k_m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    pytest.importorskip("llama_cpp")  # the key names llama.cpp's build
    config = Config("q4_k_m", "gguf", str(gguf))
    task, = runner.plan_tasks(tmp_path / "out", [config], ["timing"], replace(a, profile="x86-avx2"))
    other, = runner.plan_tasks(tmp_path / "out", [config], ["timing"], replace(b, profile="x86-avx2"))
    assert task.key["settings_sha256"] != other.key["settings_sha256"]
    task.raw.parent.mkdir(parents=True)
    task.raw.write_text(json.dumps({"schema": RAW_SCHEMA, "config": config.to_dict(), "phase": "timing",
                                    "key": {**task.key, "settings_sha256": earlier}, "result": {}}))
    assert runner.load_raw(task.raw, task.key) is None  # measured before under the earlier shape: measured again


def test_only_the_built_in_prompts_are_recorded_by_text(tmp_path):
    built_in = Settings()
    assert built_in.prompts_source == "built-in" and built_in.to_dict()["prompts"] == list(DEFAULT_PROMPTS)
    assert _settings(tmp_path, "p.txt", DEFAULT_PROMPTS[0]).to_dict().get("prompts") is None  # from a file: by digest
    mine = Settings(prompts=tuple(PROMPTS))  # a caller that names no source: a user's prompts
    d = mine.to_dict()
    assert mine.prompts_source == "file" and "prompts" not in d and MARKER not in json.dumps(d)
    back = Settings.from_dict(d)  # a report read back: the digest without the text, the same keys
    assert back.prompts == () and back.digest("timing") == mine.digest("timing") and back.to_dict() == d
    assert Settings.from_dict(d, prompts=PROMPTS) == mine  # the child, given the text on its stdin
    with pytest.raises(ValueError, match="not the ones"):
        Settings.from_dict(d, prompts=PROMPTS[:1])
    # settings an earlier edgemed wrote, with the text: what a report or a raw result now holds of them
    old = {**{k: v for k, v in d.items() if not k.startswith(("prompts_", "n_prompts"))}, "prompts": PROMPTS}
    assert public_settings(old) == d
    assert public_settings({**old, "prompts": list(DEFAULT_PROMPTS)})["prompts"] == list(DEFAULT_PROMPTS)


def test_replies_are_dropped_unless_kept_and_kept_ones_are_owner_only(smollm2_gguf, tmp_path, monkeypatch):
    """A generated reply is scored from its answer line; its text goes into the records only with ``keep_replies``,
    and then the file is 0600. A resume without it takes out the text an earlier run kept."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("tqdm")
    from edgemed.benchmarks.harness import accuracy
    from edgemed.benchmarks.harness.datasets import load_items
    from edgemed.benchmarks.harness.scorer import open_scorer

    qa = tmp_path / "clinic-qa.jsonl"
    qa.write_text(json.dumps(QUESTION) + "\n", encoding="utf-8")
    items = load_items(qa, None, seed=0)
    dropped, kept = tmp_path / "dropped.jsonl", tmp_path / "kept.jsonl"
    with open_scorer(smollm2_gguf, threads=1, n_ctx=1024) as sc:
        reply = f"{MARKER} said back.\nAnswer: D\n"
        monkeypatch.setattr(sc, "greedy", lambda tokens, max_tokens, stop=(), until=None: (reply, False))
        for path, keep in ((dropped, False), (kept, True)):
            out = accuracy.evaluate(sc, items, records_path=path, score="both", progress=False, keep_replies=keep)
            assert out["n_gen"] == 1 and out["acc_gen"] == 1.0  # scored from the reply either way
        assert MARKER.encode() not in dropped.read_bytes()
        assert MARKER.encode() in kept.read_bytes() and stat.S_IMODE(kept.stat().st_mode) == 0o600
        again = accuracy.evaluate(sc, items, records_path=kept, score="both", progress=False, keep_replies=False)
        assert again["resumed_items"] == 1 and again["acc_gen"] == 1.0
    assert MARKER.encode() not in kept.read_bytes() and stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert json.loads(kept.read_text().splitlines()[1])["reply"] is None
