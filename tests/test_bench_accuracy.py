"""Benchmark harness, accuracy side: data set loading and seeded sampling, Wilson intervals, the scorer's KV prefix
reuse (GGUF and ONNX), letter-logit and generated-answer scoring, resumable records, divergence against a reference."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from edgemed.benchmarks.harness.datasets import Item, load_items
from edgemed.benchmarks.harness.stats import wilson
from edgemed.errors import InputError

MCQ = [
    {"question": "Which vitamin deficiency causes scurvy?", "options": {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}, "answer_idx": "C"},
    {"question": "First-line treatment of anaphylaxis?", "options": {"A": "Intramuscular adrenaline", "B": "Oral antihistamine", "C": "Salbutamol", "D": "Hydrocortisone"}, "answer_idx": "A"},
    {"question": "Most common cause of community-acquired pneumonia?", "options": {"A": "Klebsiella", "B": "Streptococcus pneumoniae", "C": "Legionella", "D": "Mycoplasma"}, "answer_idx": "B"},
    {"question": "Antidote for paracetamol overdose?", "options": {"A": "Naloxone", "B": "Flumazenil", "C": "Atropine", "D": "Acetylcysteine"}, "answer_idx": "D"},
    {"question": "Which electrolyte disturbance peaks the T waves?", "options": {"A": "Hyperkalaemia", "B": "Hypokalaemia", "C": "Hyponatraemia", "D": "Hypercalcaemia"}, "answer_idx": "A"},
]


def write_mcq(path: Path, rows=MCQ) -> Path:
    path.write_text("".join(json.dumps({**r, "realidx": i}) + "\n" for i, r in enumerate(rows)), encoding="utf-8")
    return path


# -- data sets ---------------------------------------------------------------------------
def test_mcq_jsonl_loads_and_samples_with_seed(tmp_path):
    (tmp_path / "medqa").mkdir()
    f = write_mcq(tmp_path / "medqa" / "test.jsonl")
    items = load_items(f, 3, seed=0)
    assert len(items) == 3 and len({i.id for i in items}) == 3
    assert all(i.dataset == "medqa" and i.id.startswith("medqa:") and i.context is None for i in items)
    assert items == load_items(f, 3, seed=0)
    orders = {tuple(i.id for i in load_items(f, 5, seed=s)) for s in range(6)}
    assert len(orders) > 1  # the seed changes the sample
    first = next(i for i in load_items(f, None, 0) if i.question.startswith("Which vitamin"))
    assert first.options["C"] == "Vitamin C" and first.answer == "C"


@pytest.mark.parametrize("content, where", [
    ('{"question": "q", "options": {"A": "x"}, "answer_idx": "A"}\n{"question": "q2", "opt\n', "line 2"),
    ('{"question": "q", "options": {"A": "x"}, "answer_idx": "B"}\n', "line 1"),
    ('{"question": "q", "options": {"A": "x"}, "answer_idx": "A"}\n\n[1, 2]\n', "line 3"),
])
def test_bad_mcq_line_is_named(tmp_path, content, where):
    f = tmp_path / "bad.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=where) as err:
        load_items(f, None, 0)
    assert err.value.fix


def test_unknown_format_missing_file_and_too_many(tmp_path):
    (tmp_path / "x.json").write_text('{"a": 1}', encoding="utf-8")
    with pytest.raises(InputError, match="neither MCQ JSONL nor PubMedQA"):
        load_items(tmp_path / "x.json", None, 0)
    with pytest.raises(InputError, match="does not exist"):
        load_items(tmp_path / "nope.jsonl", None, 0)
    f = write_mcq(tmp_path / "m.jsonl")
    with pytest.raises(InputError, match="has 5") as err:
        load_items(f, 6, 0)
    assert "between 1 and 5" in err.value.fix


def _pqal(n_yes=6, n_no=3, n_maybe=1) -> dict:
    labels = ["yes"] * n_yes + ["no"] * n_no + ["maybe"] * n_maybe
    return {str(1000 + i): {"QUESTION": f"Does treatment {i} help?", "CONTEXTS": [f"Background {i}.", f"Result {i}."],
                            "LABELS": ["BACKGROUND", "RESULTS"], "final_decision": lab} for i, lab in enumerate(labels)}


def test_pubmedqa_restricted_to_ground_truth_and_question_only(tmp_path):
    data = _pqal()
    (tmp_path / "ori_pqal.json").write_text(json.dumps(data, indent=1), encoding="utf-8")  # multi-line JSON object
    items = load_items(tmp_path / "ori_pqal.json", None, 0)
    assert len(items) == 10 and {i.options["A"] for i in items} == {"yes"}
    assert next(i for i in items if i.id == "pubmedqa:1007").answer == "B"  # "no"
    assert "Results: Result 3." in next(i for i in items if i.id == "pubmedqa:1003").context
    truth = {"1001": "yes", "1008": "no", "1009": "maybe"}
    (tmp_path / "test_ground_truth.json").write_text(json.dumps(truth), encoding="utf-8")
    items = load_items(tmp_path / "ori_pqal.json", None, 0, context=False)
    assert sorted(i.id for i in items) == ["pubmedqa:1001", "pubmedqa:1008", "pubmedqa:1009"]
    assert all(i.context is None for i in items)
    assert {i.id: i.answer for i in items}["pubmedqa:1009"] == "C"


def test_real_pubmedqa_is_sampled_not_label_sorted():
    f = SHARED_DATA / "pubmedqa" / "ori_pqal.json"
    if not f.exists():
        pytest.skip(f"{f} not present (the shared evaluation data is not on this machine)")
    every = load_items(f, None, 0)
    assert len(every) == 500  # restricted to test_ground_truth.json's PMIDs
    sample = load_items(f, 60, seed=0)
    counts = collections.Counter(i.answer for i in sample)
    assert set(counts) == {"A", "B", "C"} and counts["A"] < 50  # the file itself starts with ~276 "yes"
    assert [i.id for i in sample] == [i.id for i in load_items(f, 60, seed=0)]
    assert [i.id for i in sample] != [i.id for i in load_items(f, 60, seed=1)]


# -- statistics -----------------------------------------------------------------------------
@pytest.mark.parametrize("k, n, lo, hi", [
    (5, 10, 0.2366, 0.7634),      # p = 0.5
    (0, 10, 0.0, 0.2775),         # z^2 / (n + z^2)
    (10, 10, 0.7225, 1.0),
])
def test_wilson_known_values(k, n, lo, hi):
    a, b = wilson(k, n)
    assert a == pytest.approx(lo, abs=6e-4) and b == pytest.approx(hi, abs=6e-4)


@pytest.mark.parametrize("k, n", [(81, 263), (3, 40), (290, 300)])
def test_wilson_bounds_invert_the_score_test(k, n):
    """Each bound p solves (k/n - p)^2 = z^2 p (1 - p) / n: the definition, independent of the closed form."""
    z = 1.959963984540054
    for p in wilson(k, n):
        assert (k / n - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, rel=1e-9)


# -- scorer: KV prefix reuse, greedy, backends --------------------------------------------------
@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory) -> dict[str, Path]:
    """One tiny random Qwen2 as an F32 GGUF and as an fp32 edgemed ONNX directory (same tokenizer, same weights)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from tiny import build_model

    from edgemed.converters.pipeline import ConvertOptions, convert

    root = tmp_path_factory.mktemp("bench-acc")
    src = build_model(root / "tiny-qwen2", arch="qwen2")
    gguf = root / "tiny-f32.gguf"
    convert(src, gguf, ConvertOptions(out_type="f32", parity=False), echo=lambda s: None)
    out = {"gguf": gguf}
    try:
        pytest.importorskip("onnx_ir")
        from edgemed.converters.onnx_export import OnnxOptions, convert_onnx

        convert_onnx(src, root / "tiny-onnx", OnnxOptions(weight_type="fp32", parity=False), echo=lambda s: None)
        out["onnx"] = root / "tiny-onnx"
    except pytest.skip.Exception:
        pass
    return out


def _scorer(tiny_artifacts, kind):
    from edgemed.benchmarks.harness.scorer import open_scorer

    if kind not in tiny_artifacts:
        pytest.skip(f"{kind} export not available here")
    return open_scorer(tiny_artifacts[kind], threads=1, n_ctx=256)


def _prompt(scorer, question: str) -> list[int]:
    system = "You answer medical questions briefly."
    return scorer.tokenize(scorer.render([{"role": "system", "content": system}, {"role": "user", "content": question}]))


@pytest.mark.parametrize("kind", ["gguf", "onnx"])
def test_prefix_reuse_gives_the_logits_of_a_fresh_evaluation(tiny_artifacts, kind):
    import numpy as np

    with _scorer(tiny_artifacts, kind) as sc:
        a = _prompt(sc, "The patient has diabetes")
        b = _prompt(sc, "Warfarin raises the INR")
        cue = sc.tokenize("Answer:", special=False)
        fresh = {tuple(t): sc.logits_all(t)[-1] for t in (a + cue, b, b + cue)}
        sc.next_logits(a)                                    # cache: a
        before = dict(sc.counters)
        got = sc.next_logits(a + cue)                        # only the cue is evaluated
        assert sc.counters["evaluated"] - before["evaluated"] == len(cue)
        np.testing.assert_allclose(got, fresh[tuple(a + cue)], atol=2e-4, rtol=1e-4)
        shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        assert shared > 5                                    # the system prompt is shared
        before = dict(sc.counters)
        got = sc.next_logits(b)                              # a diverges from b: trim, evaluate b's suffix
        assert sc.counters["reused"] - before["reused"] == shared
        np.testing.assert_allclose(got, fresh[tuple(b)], atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(sc.next_logits(b + cue), fresh[tuple(b + cue)], atol=2e-4, rtol=1e-4)
        np.testing.assert_array_equal(sc.next_logits(b + cue), sc.next_logits(b + cue))  # served from the cache


def test_greedy_matches_the_runtime_engines_greedy_text(tiny_artifacts):
    from edgemed.runtime.engine import GenerationSettings

    with _scorer(tiny_artifacts, "gguf") as sc:
        prompt_text = sc.render([{"role": "user", "content": "The patient has diabetes"}])
        sc.next_logits(_prompt(sc, "Warfarin raises the INR"))   # a different prompt in the cache first
        ours = sc.greedy(sc.tokenize(prompt_text), 12)
        theirs = "".join(sc.engine.complete(prompt_text, GenerationSettings(max_tokens=12)))
        assert ours == theirs and ours
        cut = ours[3:6]
        assert sc.greedy(sc.tokenize(prompt_text), 12, stop=(cut,)) == ours[:ours.find(cut)]
        # `until` ends decoding at the first token after which the text so far satisfies it
        seen = []
        short = sc.greedy(sc.tokenize(prompt_text), 12, until=lambda text: seen.append(text) or len(seen) == 3)
        assert short == seen[2] and ours.startswith(short) and len(short) < len(ours)


# -- accuracy: scoring, records, resume --------------------------------------------------------
def test_choice_tokens_include_both_spellings(smollm2_gguf):
    from edgemed.benchmarks.harness.accuracy import choice_probs, choice_tokens
    from edgemed.benchmarks.harness.scorer import open_scorer

    with open_scorer(smollm2_gguf, threads=1, n_ctx=512) as sc:
        toks = choice_tokens(sc, ("A", "B", "C", "D"))
        for letter in "ABCD":
            assert {sc.tokenize(letter, special=False)[0], sc.tokenize(" " + letter, special=False)[0]} <= set(toks[letter])
        words = choice_tokens(sc, ("yes", "no", "maybe"))
        assert sc.tokenize(" Yes", special=False)[0] in words["yes"]
        import numpy as np

        logits = np.zeros(sc.n_vocab, dtype=np.float32)
        logits[toks["C"][0]] = 5.0
        probs, mass = choice_probs(logits, toks)
        assert max(probs, key=probs.get) == "C" and sum(probs.values()) == pytest.approx(1.0) and 0 < mass < 1


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_evaluate_records_and_resumes_after_a_truncated_line(smollm2_gguf, tmp_path):
    from edgemed.benchmarks.harness.accuracy import evaluate
    from edgemed.benchmarks.harness.scorer import open_scorer

    items = load_items(write_mcq(tmp_path / "medqa.jsonl"), None, seed=0)
    records = tmp_path / "out" / "records.jsonl"
    with open_scorer(smollm2_gguf, threads=1, n_ctx=1024) as sc:
        first = evaluate(sc, items[:3], records_path=records, max_gen_tokens=8, progress=False)
        assert first["n"] == 3 and first["new_items"] == 3
        with open(records, "ab") as fh:
            fh.write(b'{"id": "' + items[3].id.encode() + b'", "dataset": "me')  # killed mid-write
        out = evaluate(sc, items, records_path=records, max_gen_tokens=8, progress=False)
        assert out["new_items"] == 2 and out["resumed_items"] == 3 and out["n"] == 5
        lines = _lines(records)                              # every line parses: the fragment was cut off
        assert "meta" in lines[0] and [r["id"] for r in lines[1:]] == [i.id for i in items]
        for r in lines[1:]:
            assert r["gold"] in "ABCD" and set(r["probs"]) == set("ABCD")
            assert r["logit_pred"] == max(r["probs"], key=r["probs"].get)
            assert sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-4)
            assert r["parsed_ok"] == (r["gen_pred"] is not None)
        k = sum(r["logit_pred"] == r["gold"] for r in lines[1:])
        assert out["acc_logit"] == pytest.approx(k / 5) and tuple(out["ci_logit"]) == pytest.approx(wilson(k, 5))
        assert out["unparsed"] == sum(not r["parsed_ok"] for r in lines[1:])
        assert out["per_dataset"]["medqa"]["n"] == 5
        again = evaluate(sc, items, records_path=records, max_gen_tokens=8, progress=False)
        assert again["new_items"] == 0 and again["acc_logit"] == out["acc_logit"]
        with pytest.raises(InputError, match="another run"):
            evaluate(sc, items, records_path=records, max_gen_tokens=16, progress=False)


def test_pubmedqa_items_use_the_pubmedqa_template_and_word_choices(smollm2_gguf, tmp_path):
    from edgemed.benchmarks.harness.accuracy import evaluate
    from edgemed.benchmarks.harness.scorer import open_scorer

    (tmp_path / "ori_pqal.json").write_text(json.dumps(_pqal(2, 1, 1)), encoding="utf-8")
    with_ctx = load_items(tmp_path / "ori_pqal.json", None, 0)
    no_ctx = load_items(tmp_path / "ori_pqal.json", 2, 0, context=False)
    with open_scorer(smollm2_gguf, threads=1, n_ctx=1024) as sc:
        evaluate(sc, with_ctx, records_path=tmp_path / "ctx.jsonl", max_gen_tokens=4, progress=False)
        evaluate(sc, no_ctx, records_path=tmp_path / "q.jsonl", max_gen_tokens=4, progress=False)
    recs = _lines(tmp_path / "ctx.jsonl")[1:]
    assert {r["template"] for r in recs} == {"pubmedqa"} and all(set(r["probs"]) == {"A", "B", "C"} for r in recs)
    assert {r["template"] for r in _lines(tmp_path / "q.jsonl")[1:]} == {"mcq"}
    dup = with_ctx[:1] * 2
    with pytest.raises(InputError, match="twice"):
        evaluate(None, dup, records_path=tmp_path / "d.jsonl", progress=False)


# -- divergence -------------------------------------------------------------------------------
def test_divergence_of_an_artifact_against_itself_is_zero(tiny_artifacts, tmp_path):
    from edgemed.benchmarks.harness.divergence import divergence, load_texts, reference_logits

    texts = [t[:250] for t in load_texts()[:3]]  # the tiny model has a 256-token context
    with _scorer(tiny_artifacts, "gguf") as sc:
        info = reference_logits(sc, tmp_path / "ref.npz", texts, top_k=16)
        out = divergence(sc, tmp_path / "ref.npz")
    assert info["n_tokens"] == out["all"]["n_tokens"] == out["n_tokens"] + out["first"]["n_tokens"] > 100
    assert out["first"]["n_tokens"] == 3 and out["llamacpp"]["n_tokens"] > 0  # one first position per passage
    assert out["kld_mean"] < 1e-6 and out["kld_p99"] < 1e-6 and out["top1"] == 1.0


def test_truncated_kld_matches_the_full_vocabulary_kld(tiny_artifacts, tmp_path):
    """Across backends (GGUF F32 vs ONNX fp32 of the same weights): the top-k estimate vs parity.metrics' full KLD."""
    import numpy as np

    from edgemed.benchmarks.harness.divergence import divergence, load_texts, reference_logits
    from edgemed.converters.parity import metrics

    texts = [t[:250] for t in load_texts()[:2]]
    with _scorer(tiny_artifacts, "gguf") as ref:
        tokens = [ref.tokenize(t) for t in texts]
        ref_logits = np.concatenate([ref.logits_all(t) for t in tokens])
        reference_logits(ref, tmp_path / "full.npz", texts, top_k=ref.n_vocab)
        reference_logits(ref, tmp_path / "k8.npz", texts, top_k=8)
    with _scorer(tiny_artifacts, "onnx") as other:
        other_logits = np.concatenate([other.logits_all(t) for t in tokens])
        full = divergence(other, tmp_path / "full.npz")
        k8 = divergence(other, tmp_path / "k8.npz")
    exact = metrics(ref_logits, other_logits)  # every row
    # rel 1e-3, or 1e-8 nats where both are at float32 rounding level (the npz keeps float32 log-probs)
    assert full["all"]["kld_mean"] == pytest.approx(exact["kld"], rel=1e-3, abs=1e-8)
    assert full["all"]["top1"] == exact["top1"] and full["tail_mass_mean"] == 0.0
    assert k8["kld_mean"] <= full["kld_mean"] + 1e-9      # a coarse-grained KL never exceeds the full one
    assert exact["kld"] < 1e-4                             # fp32 in both runtimes: the same model


def test_divergence_refuses_a_different_tokenizer(tiny_artifacts, smollm2_gguf, tmp_path):
    from edgemed.benchmarks.harness.divergence import divergence, load_texts, reference_logits
    from edgemed.benchmarks.harness.scorer import open_scorer

    with _scorer(tiny_artifacts, "gguf") as sc:
        reference_logits(sc, tmp_path / "ref.npz", [load_texts()[0][:250]], top_k=8)
    with open_scorer(smollm2_gguf, threads=1, n_ctx=512) as other:
        with pytest.raises(InputError, match="tokenizes passage 1 differently"):
            divergence(other, tmp_path / "ref.npz")
    with pytest.raises(InputError, match="does not exist"):
        divergence(None, tmp_path / "nope.npz")


def test_scores_do_not_depend_on_the_thread_count(smollm2_gguf):
    """llama.cpp splits a matmul's rows across threads: every logit is computed the same way whatever the count,
    which is why the accuracy key leaves threads out (``--eval-threads``)."""
    import numpy as np

    from edgemed.benchmarks.harness.scorer import open_scorer

    logits = []
    for threads in (1, 2):
        with open_scorer(smollm2_gguf, threads=threads, n_ctx=256) as sc:
            logits.append(sc.logits_all(_prompt(sc, "A 70-year-old man on warfarin has an INR of 6.2 and no bleeding.")))
    np.testing.assert_array_equal(logits[0], logits[1])
