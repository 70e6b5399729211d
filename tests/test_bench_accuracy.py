"""Benchmark harness, accuracy side: data set loading and seeded, prefix-stable sampling (PubMedQA's test split only,
the default suite), Wilson intervals and the paired statistics (Newcombe interval, exact McNemar, detectable
difference), the scorer's KV prefix reuse (GGUF and ONNX), letter-logit and generated-answer scoring, resumable
records that a larger draw extends, divergence against a reference."""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import random
from pathlib import Path

import pytest

from conftest import EVAL_DATA, need_shared_data
from edgemed.benchmarks.harness import stats
from edgemed.benchmarks.harness.datasets import PUBMEDQA_GROUND_TRUTH, SUITE, Item, draw, load_eval_set, load_items, suite_files
from edgemed.benchmarks.harness.stats import wilson
from edgemed.errors import InputError

SAMPLE = EVAL_DATA / "sample"  # laid out like the full data, MIT: its README names the sources and how it was drawn
TEST_SPLIT = EVAL_DATA / "pubmedqa-test-split" / PUBMEDQA_GROUND_TRUTH  # PubMedQA's 500 test-split PMIDs

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
    for n in range(1, 5):  # prefix-stable: a larger draw starts with the smaller one
        assert load_items(f, n + 1, seed=3)[:n] == load_items(f, n, seed=3)


def test_draw_is_a_seeded_permutation_prefix_for_every_n():
    items = list(range(2816))  # MedMCQA's size
    full = draw(items, len(items), seed=0)
    assert sorted(full) == items and full != items
    for n in (1, 5, 21, 300, 301, 600, 1500, 2816):
        assert draw(items, n, seed=0) == full[:n]
    assert draw(items, 300, seed=1) != full[:300]
    # why not random.sample: it switches method with k (set-based below, pool-based from ~k = 300 here), so its
    # 600-item sample does not start with its 300-item one and a larger run would score other items
    assert random.Random(0).sample(items, 600)[:300] != random.Random(0).sample(items, 300)


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


def _pubmedqa_dir(path: Path, data: dict, truth: dict | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "ori_pqal.json").write_text(json.dumps(data, indent=1), encoding="utf-8")  # multi-line JSON object
    if truth is not None:
        (path / PUBMEDQA_GROUND_TRUTH).write_text(json.dumps(truth), encoding="utf-8")
    return path / "ori_pqal.json"


def test_pubmedqa_is_its_test_split_only(tmp_path):
    data = _pqal()
    # without the official split's PMIDs the calibration abstracts cannot be told apart: refused, not guessed
    with pytest.raises(InputError, match="test_ground_truth.json beside it") as err:
        load_items(_pubmedqa_dir(tmp_path / "bare", data, None), None, 0)
    assert "imatrix calibration" in str(err.value) and "copy test_ground_truth.json" in err.value.fix
    truth = {"1001": "yes", "1007": "no", "1003": "yes", "1009": "maybe"}
    f = _pubmedqa_dir(tmp_path / "split", data, truth)
    items = load_items(f, None, 0)
    assert sorted(i.id for i in items) == ["pubmedqa:1001", "pubmedqa:1003", "pubmedqa:1007", "pubmedqa:1009"]
    assert {i.options["A"] for i in items} == {"yes"} and {i.id: i.answer for i in items}["pubmedqa:1007"] == "B"
    assert "Results: Result 3." in next(i for i in items if i.id == "pubmedqa:1003").context
    items = load_items(f, None, 0, context=False)
    assert all(i.context is None for i in items) and {i.id: i.answer for i in items}["pubmedqa:1009"] == "C"
    with pytest.raises(InputError, match="names PMID 4242"):
        load_items(_pubmedqa_dir(tmp_path / "other", data, {**truth, "4242": "yes"}), None, 0)


def test_real_pubmedqa_is_its_test_split_sampled_not_label_sorted():
    """Real PubMedQA entries (the repo's sample: 32 test-split abstracts and 8 of the other PQA-L ones, its labels
    sorted as the real file's are): only the test split is scored, and a draw is not the file's first items."""
    f = SAMPLE / "pubmedqa" / "ori_pqal.json"
    every = load_items(f, None, 0)
    truth = json.loads(f.with_name(PUBMEDQA_GROUND_TRUTH).read_text(encoding="utf-8"))
    calibration = set(json.loads(f.read_text(encoding="utf-8"))) - set(truth)  # PQA-L abstracts outside the split
    split = set(json.loads(TEST_SPLIT.read_text(encoding="utf-8")))
    assert len(split) == 500 and len(every) == len(truth) == 32 and len(calibration) == 8
    ids = {i.id.split(":")[1] for i in every}
    assert ids == set(truth) <= split and not ids & calibration and not calibration & split
    assert list(truth.values()) == sorted(truth.values(), key=["yes", "no", "maybe"].index)  # 17 "yes" first
    sample = load_items(f, 12, seed=0)
    counts = collections.Counter(i.answer for i in sample)
    assert set(counts) == {"A", "B", "C"} and counts["A"] < 12  # the file's first 12 are all "yes"
    assert [i.id for i in sample] == [i.id for i in load_items(f, 12, seed=0)]
    assert [i.id for i in sample] != [i.id for i in load_items(f, 12, seed=1)]


def test_the_default_suite_reads_a_folder_laid_out_like_the_shared_data():
    """The suite's files, drawn per set with one seed and prefix-stable, on the repo's sample of the real sets; the
    default counts need the full sets, and asking the sample for them names the file and its size."""
    files = suite_files(SAMPLE)
    paths = [p for p, _ in files]
    assert paths == [(SAMPLE / row.path).resolve() for row in SUITE] and [n for _, n in files] == [row.n for row in SUITE]
    items = load_eval_set(paths, [20, 20, 20], seed=0, context=False)
    counts = collections.Counter(i.dataset for i in items)
    assert counts == {row.name: 20 for row in SUITE} and len({i.id for i in items}) == len(items)
    assert {i.id.split(":")[1] for i in items if i.dataset == "pubmedqa"} <= set(json.loads(TEST_SPLIT.read_text()))
    assert all(i.context is None for i in items)
    smaller = load_eval_set(paths, [10, 10, 10], seed=0, context=False)
    assert [i.id for i in smaller] == [i.id for k in range(3) for i in items[20 * k:20 * k + 10]]  # prefix-stable per set
    with pytest.raises(InputError, match="has no medagentsbench/medmcqa/test.jsonl") as err:
        suite_files(SAMPLE / "medagentsbench")
    assert "--eval" in err.value.fix
    with pytest.raises(InputError, match="Asked for 600 items from .*medmcqa.*, which has 40"):
        load_eval_set(paths, [n for _, n in files], seed=0)


def test_the_default_suite_on_the_full_shared_data():
    root = need_shared_data("medagentsbench", "the default suite draws 600 + 500 + 500 items")
    files = suite_files(root.parent)
    assert [n for _, n in files] == [row.n for row in SUITE] and sum(n for _, n in files) >= 1500
    items = load_eval_set([p for p, _ in files], [n for _, n in files], seed=0, context=False)
    counts = collections.Counter(i.dataset for i in items)
    assert counts == {row.name: row.n for row in SUITE} and len({i.id for i in items}) == len(items)
    split = set(json.loads((root.parent / "pubmedqa" / PUBMEDQA_GROUND_TRUTH).read_text(encoding="utf-8")))
    assert {i.id.split(":")[1] for i in items if i.dataset == "pubmedqa"} <= split and len(split) == 500
    assert all(i.context is None for i in items)
    smaller = load_eval_set([p for p, _ in files], [100, 100, 100], seed=0, context=False)
    assert set(i.id for i in smaller) <= set(i.id for i in items)  # prefix-stable per set


def test_the_repo_sample_is_what_its_script_draws(tmp_path):
    """tests/fixtures/eval-data is draw.py's output from the full sets, byte for byte, and every line or entry in it
    is the source's own text."""
    source = need_shared_data("pubmedqa/ori_pqal.json", "the sample is redrawn from the full sets").parents[1]
    spec = importlib.util.spec_from_file_location("eval_data_draw", EVAL_DATA / "draw.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.draw(source, tmp_path)
    drawn = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    kept = sorted(p.relative_to(EVAL_DATA) for p in EVAL_DATA.rglob("*")
                  if p.is_file() and p.name not in ("README.md", "draw.py") and "__pycache__" not in p.parts)
    assert drawn == kept
    for rel in drawn:
        assert (tmp_path / rel).read_bytes() == (EVAL_DATA / rel).read_bytes(), rel
    for name in ("medmcqa", "mmlu"):
        full = set((source / "medagentsbench" / name / "test.jsonl").read_text(encoding="utf-8").splitlines())
        assert set((SAMPLE / "medagentsbench" / name / "test.jsonl").read_text(encoding="utf-8").splitlines()) <= full
    full = (source / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8")
    for pmid, entry in json.loads((SAMPLE / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8")).items():
        assert json.dumps({pmid: entry}, indent=4)[2:-2] in full, pmid  # the entry as the source writes it


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


def test_paired_difference_interval_matches_the_published_newcombe_value():
    """Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8, Cavo et al. 2012:
    [[59, 6], [16, 80]], the Newcombe square-and-add interval -0.0621 (-0.1186 to -0.0046), as the book's R
    package contingencytables tests it."""
    lo, hi = stats.paired_difference_ci(59, 6, 16, 80)
    assert (round(lo, 4), round(hi, 4)) == (-0.1186, -0.0046)
    assert stats.paired_difference_ci(59, 16, 6, 80) == pytest.approx((-hi, -lo))  # swapping the systems


def test_paired_difference_interval_by_hand():
    """[[500, 7], [19, 74]] (a 600-item table with the 1.5B first run's discordant pairs, 7 and 19), computed step by
    step without stats.py."""
    z = 1.959963984540054
    n, p1, p2 = 600, 507 / 600, 519 / 600

    def wilson_roots(p):  # the bounds solve (p - x)^2 = z^2 x (1 - x) / n: a quadratic in x
        a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
        r = math.sqrt(b * b - 4 * a * c)
        return (-b - r) / (2 * a), (-b + r) / (2 * a)

    (l1, u1), (l2, u2) = wilson_roots(p1), wilson_roots(p2)
    a_ = 500 * 74 - 7 * 19                                    # 36867 > n / 2
    phi = (a_ - n / 2) / math.sqrt(507 * 93 * 519 * 81)       # 0.8098...
    lower = (p1 - p2) - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    upper = (p1 - p2) + math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    assert (round(lower, 4), round(upper, 4)) == (-0.0378, -0.0029)
    assert stats.paired_difference_ci(500, 7, 19, 74) == pytest.approx((lower, upper), abs=1e-12)
    # nothing discordant: a real interval around 0, not a point (the Wald interval would collapse)
    lo, hi = stats.paired_difference_ci(40, 0, 0, 60)
    assert lo < 0 < hi and hi - lo > 0.02


def test_exact_mcnemar_and_detectable_difference_by_hand():
    # Cavo: 6 vs 16 discordant pairs; 2 * P(X <= 6), X ~ Bin(22, 1/2) = 2 * (1+22+231+1540+7315+26334+74613) / 2^22
    assert stats.mcnemar(6, 16) == pytest.approx(2 * 110056 / 2 ** 22) == pytest.approx(0.0525, abs=1e-4)
    assert stats.mcnemar(16, 6) == stats.mcnemar(6, 16) and stats.mcnemar(0, 0) == 1.0
    # Connor (1987): n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2; the mdd must give back n
    za, zb = 1.959963984540054, 0.8416212335729143
    for n, psi in ((1600, 0.043), (600, 0.043), (1600, 0.10), (3400, 0.043)):
        d = stats.mcnemar_mdd(n, psi)
        assert (za * math.sqrt(psi) + zb * math.sqrt(psi - d * d)) ** 2 / (d * d) == pytest.approx(n, rel=1e-9)
    assert stats.mcnemar_mdd(1600, 0.043) == pytest.approx(0.01451, abs=1e-5)   # 1.45 points
    assert stats.mcnemar_mdd(3400, 0.043) < 0.01 < stats.mcnemar_mdd(3300, 0.043)  # 1 point needs ~3,400 pairs
    assert stats.mcnemar_mdd(1600, 0.0) is None and stats.mcnemar_mdd(10, 0.01) is None  # nothing / too few


def test_paired_figures_from_a_table():
    p = stats.paired(500, 7, 19, 74)
    assert (p["n"], p["gained"], p["lost"], p["diff"]) == (600, 7, 19, pytest.approx(-0.02))
    assert p["mcnemar_p"] == pytest.approx(0.02896, abs=1e-5) and p["discordance"] == pytest.approx(26 / 600)
    assert p["diff_ci"] == pytest.approx(list(stats.paired_difference_ci(500, 7, 19, 74)))
    assert p["mdd"] == pytest.approx(stats.mcnemar_mdd(600, 26 / 600)) and p["resolves"] is False
    assert "Newcombe" in p["diff_ci_method"]
    big = stats.paired(3000, 60, 70, 870)                         # 4,000 pairs, 3.25 % discordant
    assert big["resolves"] is True and big["mdd"] < 0.01


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
        from edgemed.converters.onnx.export import OnnxOptions, convert_onnx

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
        before = sc.counters["generated"]
        ours, at_limit = sc.greedy(sc.tokenize(prompt_text), 12)
        theirs = "".join(sc.engine.complete(prompt_text, GenerationSettings(max_tokens=12)))
        assert ours == theirs and ours
        assert at_limit == (sc.counters["generated"] - before == 12)  # cut only where it ran to the limit
        cut = ours[3:6]
        assert sc.greedy(sc.tokenize(prompt_text), 12, stop=(cut,)) == (ours[:ours.find(cut)], False)
        # `until` ends decoding at the first token after which the text so far satisfies it: not cut
        seen = []
        short, at_limit = sc.greedy(sc.tokenize(prompt_text), 12, until=lambda text: seen.append(text) or len(seen) == 3)
        assert short == seen[2] and ours.startswith(short) and len(short) < len(ours) and not at_limit


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


def test_logits_only_records_and_a_larger_draw_extends_them(smollm2_gguf, tmp_path):
    from edgemed.benchmarks.harness.accuracy import evaluate
    from edgemed.benchmarks.harness.scorer import open_scorer

    f = write_mcq(tmp_path / "medqa.jsonl")
    records = tmp_path / "records.jsonl"
    with open_scorer(smollm2_gguf, threads=1, n_ctx=1024) as sc:
        small = evaluate(sc, load_items(f, 2, seed=5), records_path=records, score="logits", progress=False)
        assert small["n"] == 2 and small["acc_gen"] is None and small["n_gen"] == 0 and small["unparsed"] == 0
        assert small["gen_tokens"] == 0 and small["score"] == "logits"
        big = evaluate(sc, load_items(f, 4, seed=5), records_path=records, score="logits", progress=False)
        assert (big["new_items"], big["resumed_items"], big["n"]) == (2, 2, 4)  # the same 2 first, 2 new ones
        # an item whose text changed under the same id is scored again, not taken from the records
        changed = [Item(it.id, it.dataset, it.question + " (revised)", it.options, it.answer) if k == 0 else it
                   for k, it in enumerate(load_items(f, 4, seed=5))]
        again = evaluate(sc, changed, records_path=records, score="logits", progress=False)
        assert (again["new_items"], again["resumed_items"]) == (1, 3)
        with pytest.raises(InputError, match="another run"):
            evaluate(sc, changed, records_path=records, score="both", progress=False)
        with pytest.raises(InputError, match="Unknown score"):
            evaluate(sc, changed, records_path=records, score="generated", progress=False)
    recs = _lines(records)[1:]
    assert all(r["gen_pred"] is None and r["parsed_ok"] is None and r["reply"] is None and r["gen_s"] == 0 for r in recs)
    assert all(len(r["item_sha"]) == 16 and r["logit_s"] > 0 for r in recs)
    # whether the bench runner resumes records under a key: tests/test_bench_resume_keys.py


def test_pubmedqa_items_use_the_pubmedqa_template_and_word_choices(smollm2_gguf, tmp_path):
    from edgemed.benchmarks.harness.accuracy import evaluate
    from edgemed.benchmarks.harness.scorer import open_scorer

    data = _pqal(2, 1, 1)
    f = _pubmedqa_dir(tmp_path, data, {pmid: entry["final_decision"] for pmid, entry in data.items()})
    with_ctx = load_items(f, None, 0)
    no_ctx = load_items(f, 2, 0, context=False)
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
    from edgemed.converters.quality.parity import metrics

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


def test_divergence_refuses_a_reference_written_under_another_key(tiny_artifacts, tmp_path):
    """The reference names the key it was written under (the F16's sha256, runtime, settings): a divergence against
    the logits of an earlier F16 is refused, not labelled with the current one."""
    from edgemed.benchmarks.harness.divergence import divergence, load_texts, reference_key, reference_logits

    old, new = {"model_sha256": "a" * 64, "profile": "x86-avx2"}, {"model_sha256": "b" * 64, "profile": "x86-avx2"}
    with _scorer(tiny_artifacts, "gguf") as sc:
        reference_logits(sc, tmp_path / "ref.npz", [load_texts()[0][:250]], top_k=8, key=old)
        assert reference_key(tmp_path / "ref.npz") == old
        assert divergence(sc, tmp_path / "ref.npz", key=old)["kld_mean"] < 1e-6
        with pytest.raises(InputError, match="not of the current reference") as err:
            divergence(sc, tmp_path / "ref.npz", key=new)
        assert "model_sha256 differs" in str(err.value) and "bbbbbbbbbbbbbbbb" in str(err.value)
        assert "run the divergence phase with the reference configuration" in err.value.fix
    assert reference_key(tmp_path / "missing.npz") is None


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


def test_a_logits_only_record_spends_no_generation_time_however_the_clock_runs(smollm2_gguf, tmp_path, monkeypatch):
    """gen_s was the item's time less its logits time: a pause of the box between the two clock reads (a loaded CI
    machine) gave a logits-only record a generation time. Each clock read here is 10 ms after the last."""
    import itertools

    from edgemed.benchmarks.harness import accuracy
    from edgemed.benchmarks.harness.scorer import open_scorer

    ticks = itertools.count()
    monkeypatch.setattr(accuracy.time, "perf_counter", lambda: next(ticks) * 0.01)
    records = tmp_path / "records.jsonl"
    with open_scorer(smollm2_gguf, threads=1, n_ctx=1024) as sc:
        accuracy.evaluate(sc, load_items(write_mcq(tmp_path / "medqa.jsonl"), 2, seed=5), records_path=records,
                          score="logits", progress=False)
    recs = _lines(records)[1:]
    assert len(recs) == 2 and all(r["gen_s"] == 0 and r["logit_s"] > 0 for r in recs)


def test_a_generated_answer_is_read_from_the_answer_line_not_from_a_list_of_the_options(smollm2_gguf, tmp_path, monkeypatch):
    """Decoding stopped at the first line that parsed by any rule: a reply that starts by going through the options
    ("A. ...") stopped there and scored A, while the reply goes on to answer C."""
    from edgemed.benchmarks.harness import accuracy
    from edgemed.benchmarks.harness.scorer import open_scorer

    reply = "A. Hypertension is unlikely here.\nB. Nor is this.\nAnswer: C\nBecause of the rash.\n"
    records = tmp_path / "records.jsonl"
    with open_scorer(smollm2_gguf, threads=1, n_ctx=1024) as sc:
        def greedy(tokens, max_tokens, stop=(), until=None):  # the model's reply, one line at a time
            text = ""
            for line in reply.splitlines(keepends=True):
                text += line
                if until is not None and until(text):
                    break
            return text, False

        monkeypatch.setattr(sc, "greedy", greedy)
        accuracy.evaluate(sc, load_items(write_mcq(tmp_path / "medqa.jsonl"), 1, seed=5), records_path=records,
                          score="both", progress=False, max_gen_tokens=64)
    rec = _lines(records)[1]
    options = sorted(rec["probs"])
    assert rec["parsed_ok"] and rec["reply"].endswith("Answer: C\n") and "rash" not in rec["reply"]
    assert rec["gen_pred"] == options[2]  # the third option, as the reply's answer line says


@pytest.mark.parametrize("diff,ci,met", [
    (-0.008, [-0.019, 0.003], "not shown (95 % interval: up to 1.9 points below)"),  # the 1.5B's 1,600 items
    (-0.004, [-0.009, 0.001], "yes"),
    (-0.020, [-0.030, -0.010], "**no**"),
])
def test_the_accuracy_goal_is_met_only_where_the_paired_interval_stays_within_it(diff, ci, met):
    """A point estimate within 1 point says nothing when the interval reaches past it: the report said "yes"."""
    from edgemed.benchmarks.harness.goals import check_goals

    paired = {"n": 1600, "diff": diff, "diff_ci": ci}
    results = {"configs": [{"name": "f16", "accuracy": {"acc_logit": 0.42}},
                           {"name": "q4_k_m", "accuracy": {"acc_logit": 0.42 + diff, "paired_vs_reference": paired}}]}
    rows = [row for row in check_goals(results) if row[0].startswith("Q4_K_M accuracy")]
    assert rows and rows[0][2] == met, rows


def test_accuracy_floors_are_computed_from_the_records(tmp_path):
    """Chance, the always-the-commonest-letter floor and each run's accuracy, per dataset, from per-item records."""
    from edgemed.benchmarks import accuracy_baselines

    def write(name, picks):
        golds = [("pubmedqa", "A"), ("pubmedqa", "A"), ("pubmedqa", "B"), ("medmcqa", "C"), ("medmcqa", "D")]
        lines = [json.dumps({"meta": {"version": 3}})]
        for i, ((dataset, gold), pick) in enumerate(zip(golds, picks)):
            k = 3 if dataset == "pubmedqa" else 4
            lines.append(json.dumps({"id": f"{dataset}:{i}", "dataset": dataset, "gold": gold, "logit_pred": pick,
                                     "probs": {c: 1 / k for c in "ABCD"[:k]}}))
        (tmp_path / f"{name}-accuracy.records.jsonl").write_text("\n".join(lines) + "\n")

    write("f16", ["B", "B", "B", "C", "C"])
    write("q4", ["A", "A", "B", "A", "A"])
    out = accuracy_baselines.main([str(tmp_path), "--out", str(tmp_path / "floors.json")])
    assert out["pubmedqa"]["majority"] == pytest.approx(2 / 3) and out["pubmedqa"]["chance"] == pytest.approx(1 / 3)
    assert out["pubmedqa"]["runs"]["f16"] == {"accuracy": pytest.approx(1 / 3), "commonest_pick_share": 1.0}
    assert out["pubmedqa"]["runs"]["q4"]["accuracy"] == 1.0
    assert out["medmcqa"]["majority"] == 0.5 and out["medmcqa"]["runs"]["f16"]["accuracy"] == 0.5
    assert out["all"]["majority"] == pytest.approx(3 / 5) and out["all"]["chance"] == pytest.approx((3 / 3 + 2 / 4) / 5)
    assert (tmp_path / "floors.md").read_text().count("\n| ") == 4  # header + pubmedqa, medmcqa, all ... rows
    write("q4", ["A", "A", "B", "A"])  # one item short: not paired with the first run
    with pytest.raises(SystemExit, match="not the same items"):
        accuracy_baselines.main([str(tmp_path)])
