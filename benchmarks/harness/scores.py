"""Accuracy and divergence in the report: paired comparison with the reference per set and pooled, the
accuracy-and-divergence tables of report.md, and their columns in results.csv.

**results.json** (each configuration's ``accuracy``; ``stats.paired`` computes the paired dicts):

- ``n``, ``acc_logit``, ``ci_logit`` (Wilson 95 %), ``n_gen``, ``acc_gen``, ``ci_gen``, ``unparsed``, ``thinking`` (items
  whose chat template opened a thought: ``accuracy`` says how they are scored): pooled over
  every item of every set (a micro-average: each item counts once, so a set weighs by its count);
- ``per_dataset[<set>]``: the same per set, each with its own ``paired_vs_reference``;
- ``paired_vs_reference`` (pooled): ``reference``, ``n`` (items both have), ``gained`` / ``lost`` (right only for
  this configuration / only for the reference, letter logits), ``both_right``, ``both_wrong``, ``same_answer``
  (share of items with the same predicted letter), ``excluded`` (ids both have that are not one item: another
  ``item_sha`` or gold, as PubMedQA with and without its abstract; left unpaired), ``diff`` = (gained - lost) / n, ``diff_ci`` (95 %, Newcombe's
  hybrid score method 10, named in ``diff_ci_method``), ``mcnemar_p`` (exact), ``discordance`` = (gained + lost) /
  n, ``mdd`` (the smallest difference n pairs detect with 80 % power at alpha 0.05 at that discordance, Connor
  1987) and ``resolves`` (mdd <= 1 point);
- ``paired_vs_plain`` (pooled and per set, ``<quant>-imatrix`` configurations only): the same figures against the
  plain ``<quant>`` (importance matrix on vs off), ``reference`` naming it. report.md gives them a table of their own
  with each side's size and KL divergence.

**results.csv** (one row per configuration; empty where not measured):

| column | meaning |
|---|---|
| ``acc_n``, ``acc_logit``, ``acc_logit_ci_low``, ``acc_logit_ci_high``, ``acc_gen`` | pooled accuracy (fractions) |
| ``acc_gen_n``, ``acc_gen_no_answer`` | generated answers scored, and those with no single answer (``unparsed``) |
| ``acc_n_<set>``, ``acc_logit_<set>`` | per set |
| ``paired_n``, ``paired_gained``, ``paired_lost``, ``paired_same_answer`` | pooled pairs vs the reference |
| ``paired_diff``, ``paired_diff_ci_low``, ``paired_diff_ci_high``, ``mcnemar_p``, ``paired_mdd`` | pooled paired test |
| ``paired_diff_<set>``, ``mcnemar_p_<set>``, ``paired_mdd_<set>`` | per set |
| ``vs_plain_gained``, ``vs_plain_lost``, ``vs_plain_diff``, ``vs_plain_mcnemar_p`` | ``<quant>-imatrix`` vs ``<quant>``, pooled |
| ``kld_mean``, ``kld_p99``, ``top1``, ``kld_n_tokens`` | headline divergence (each passage's first position left out) |
| ``kld_llamacpp``, ``kld_llamacpp_p99``, ``top1_llamacpp`` | second half of each passage (llama-perplexity's rows) |
| ``kld_first``, ``top1_first`` | the left-out first positions alone |
| ``kld_all``, ``top1_all`` | every position (the only figure of a raw file from before the headline rule) |
"""

from __future__ import annotations

import json
from pathlib import Path

from edgemed.benchmarks.harness.configs import REFERENCE
from edgemed.benchmarks.harness.stats import paired

POOLED = "pooled"


# -- records ----------------------------------------------------------------------------------
def read_records(out: Path, name: str, keep: dict | set | None = None) -> dict[str, dict]:
    """id -> record of a configuration's accuracy records (``read_file``), restricted to the ids in ``keep`` when
    given (the items of the current draw)."""
    return read_file(out / "raw" / f"{name}-accuracy.records.jsonl", keep)


def read_file(path: Path, keep: dict | set | None = None) -> dict[str, dict]:
    """id -> record of an accuracy records file, read only: the last line of an id wins (a record redone after its
    item changed, a resumed run), a line cut by a kill is skipped; restricted to the ids in ``keep`` when given."""
    found = {}
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a kill: the accuracy phase redoes it
                continue
            if "id" in rec and (keep is None or rec["id"] in keep):
                found[rec["id"]] = rec
    except OSError:
        pass
    return found


def current_draw(settings) -> dict[str, str] | None:
    """id -> ``item_sha`` (``accuracy.item_digest``: what the model is shown, and the gold) of the items the settings
    draw, or None when they draw none or the data files cannot be read here (then every record counts: a report
    rebuilt on another machine). As ``keep``, it restricts records to these ids."""
    from edgemed.benchmarks.harness.accuracy import item_digest
    from edgemed.benchmarks.harness.datasets import load_eval_set
    from edgemed.errors import InputError

    if not getattr(settings, "evals", None):
        return None
    try:
        return {it.id: item_digest(it) for it in load_eval_set(settings.evals, settings.eval_counts, settings.seed,
                                                               context=settings.eval_context)}
    except (InputError, OSError):
        return None


def own_records(path: Path, key: dict, draw: dict | set | None = None) -> list[dict]:
    """The records at ``path`` that are a configuration's own: none unless the meta line names its artifact (sha256)
    and ``key`` (``report._accuracy_keys``) under this scoring version, and of those the items of ``draw`` (a dict:
    the same ids asked the same way, ``item_sha``; a set: the same ids; None: every one)."""
    from edgemed.benchmarks.harness.accuracy import RECORDS_VERSION, records_meta

    meta = records_meta(path) or {}
    if meta.get("version") != RECORDS_VERSION or meta.get("key") != key or \
            (meta.get("artifact") or {}).get("sha256") != key.get("model_sha256"):
        return []
    found = read_file(path, draw).values()
    return [r for r in found if not isinstance(draw, dict) or r.get("item_sha") == draw[r["id"]]]


def in_progress(out: Path, entries: list[dict], keys: dict[str, dict], keep: dict | set | None = None) -> None:
    """An accuracy phase that has not finished (a run still going, or stopped) is reported from its records so
    far, marked partial; the paired comparison then covers exactly the items both have. Only a configuration's own
    records count (``own_records``: ``keys`` holds each one's, ``keep`` the current draw): another artifact's left
    under its name, or items asked another way, are not its accuracy."""
    from edgemed.benchmarks.harness.accuracy import per_dataset, summarize

    for e in entries:
        if e.get("accuracy") or e["name"] not in keys:
            continue
        recs = own_records(out / "raw" / f"{e['name']}-accuracy.records.jsonl", keys[e["name"]], keep)
        if recs:
            e["accuracy"] = {**summarize(recs), "partial": True, "per_dataset": per_dataset(recs)}


# -- paired comparison ------------------------------------------------------------------------
def compare(mine: dict[str, dict], base: dict[str, dict], reference: str = REFERENCE) -> dict[str, dict]:
    """Paired figures (``stats.paired`` + ``same_answer``) of ``mine`` vs ``base`` (named ``reference``) on the items
    both have, per set and ``POOLED``, by the letter-logit prediction. An id both have is one item only where what
    the model was shown and the gold answer are the same (``item_sha``, ``gold``): PubMedQA asked with its abstract in
    one result kept from an earlier run and without it in the other is not paired, and counted in ``excluded``."""
    def one_item(i: str) -> bool:
        return all(mine[i].get(k) == base[i].get(k) for k in ("item_sha", "gold", "dataset"))

    shared = [i for i in mine if i in base]
    common = [i for i in shared if one_item(i)]
    groups, excluded = {POOLED: common}, {POOLED: len(shared) - len(common)}
    for i in shared:
        groups.setdefault(mine[i]["dataset"], [])
        if one_item(i):
            groups[mine[i]["dataset"]].append(i)
        else:
            excluded[mine[i]["dataset"]] = excluded.get(mine[i]["dataset"], 0) + 1
    out = {}
    for name, ids in groups.items():
        right = [(mine[i]["logit_pred"] == mine[i]["gold"], base[i]["logit_pred"] == base[i]["gold"]) for i in ids]
        fig = paired(sum(m and b for m, b in right), sum(m and not b for m, b in right),
                     sum(b and not m for m, b in right), sum(not (m or b) for m, b in right))
        same = sum(mine[i]["logit_pred"] == base[i]["logit_pred"] for i in ids)
        out[name] = {"reference": reference, **fig, "same_answer": same / len(ids) if ids else None,
                     "excluded": excluded.get(name, 0)}
    return out


def _attach(entry: dict, figures: dict[str, dict], key: str, reference: str) -> None:
    entry["accuracy"][key] = figures.get(POOLED) or {"reference": reference, "n": 0}
    for ds, summary in (entry["accuracy"].get("per_dataset") or {}).items():
        if ds in figures:
            summary[key] = figures[ds]


def plain_of(name: str) -> str | None:
    """The configuration a ``<quant>-imatrix`` one is paired with (importance matrix off); None for any other."""
    from edgemed.benchmarks.harness.artifacts import IMATRIX_SUFFIX

    return name.removesuffix(IMATRIX_SUFFIX) if name.endswith(IMATRIX_SUFFIX) else None


def add_paired(out: Path, entries: list[dict], keep: dict | set | None = None) -> None:
    """Each scored configuration's accuracy gets ``paired_vs_reference``, pooled and in every ``per_dataset``; a
    ``<quant>-imatrix`` one also ``paired_vs_plain`` against ``<quant>``."""
    by_name = {e["name"]: e for e in entries if e.get("accuracy")}
    ref = by_name.get(REFERENCE)
    base = read_records(out, REFERENCE, keep) if ref is not None else {}
    for e in by_name.values():
        mine = read_records(out, e["name"], keep)
        if ref is not None and e is not ref:
            _attach(e, compare(mine, base), "paired_vs_reference", REFERENCE)
        plain = plain_of(e["name"])
        if plain in by_name:
            _attach(e, compare(mine, read_records(out, plain, keep), plain), "paired_vs_plain", plain)


# -- divergence ---------------------------------------------------------------------------------
def divergence_figures(d: dict | None) -> dict:
    """The divergence columns, whatever the raw file's age: a file from before the headline rule (no ``first``)
    has only the every-position figures, reported as ``all``."""
    d = d or {}
    if not d:
        return {}
    if "first" not in d:  # measured before the headline rule: kld_mean etc. were over every position
        return {"legacy": True, "kld_all": d.get("kld_mean"), "top1_all": d.get("top1"), "kld_all_p99": d.get("kld_p99")}
    llama, first, every = d.get("llamacpp") or {}, d.get("first") or {}, d.get("all") or {}
    return {"kld_mean": d.get("kld_mean"), "kld_p99": d.get("kld_p99"), "top1": d.get("top1"),
            "kld_n_tokens": d.get("n_tokens"), "kld_llamacpp": llama.get("kld_mean"),
            "kld_llamacpp_p99": llama.get("kld_p99"), "top1_llamacpp": llama.get("top1"),
            "kld_first": first.get("kld_mean"), "top1_first": first.get("top1"), "kld_all": every.get("kld_mean"),
            "top1_all": every.get("top1"), "rule": d.get("rule")}


# -- results.csv -----------------------------------------------------------------------------------
def _r(v, digits):
    return None if v is None else round(float(v), digits)


def csv_columns(e: dict) -> dict:
    """The accuracy and divergence columns of one configuration's results.csv row (the table above)."""
    a = e.get("accuracy") or {}
    ci = a.get("ci_logit") or (None, None)
    row = {"acc_n": a.get("n"), "acc_logit": _r(a.get("acc_logit"), 4), "acc_logit_ci_low": _r(ci[0], 4),
           "acc_logit_ci_high": _r(ci[1], 4), "acc_gen": _r(a.get("acc_gen"), 4),
           "acc_gen_n": a.get("n_gen") or None, "acc_gen_no_answer": a.get("unparsed") if a.get("n_gen") else None}
    for ds, s in (a.get("per_dataset") or {}).items():
        row[f"acc_n_{ds}"], row[f"acc_logit_{ds}"] = s.get("n"), _r(s.get("acc_logit"), 4)
    p = a.get("paired_vs_reference") or {}
    dci = p.get("diff_ci") or (None, None)
    row.update({"paired_n": p.get("n") or None, "paired_gained": p.get("gained"), "paired_lost": p.get("lost"),
                "paired_same_answer": _r(p.get("same_answer"), 4), "paired_diff": _r(p.get("diff"), 4),
                "paired_diff_ci_low": _r(dci[0], 4), "paired_diff_ci_high": _r(dci[1], 4),
                "mcnemar_p": _r(p.get("mcnemar_p"), 4), "paired_mdd": _r(p.get("mdd"), 4)})
    for ds, s in (a.get("per_dataset") or {}).items():
        q = s.get("paired_vs_reference") or {}
        row[f"paired_diff_{ds}"], row[f"mcnemar_p_{ds}"] = _r(q.get("diff"), 4), _r(q.get("mcnemar_p"), 4)
        row[f"paired_mdd_{ds}"] = _r(q.get("mdd"), 4)
    v = a.get("paired_vs_plain") or {}
    if v.get("n"):
        row.update({"vs_plain_gained": v["gained"], "vs_plain_lost": v["lost"], "vs_plain_diff": _r(v.get("diff"), 4),
                    "vs_plain_mcnemar_p": _r(v.get("mcnemar_p"), 4)})
    d = divergence_figures(e.get("divergence"))
    for k in ("kld_mean", "kld_p99", "top1", "kld_n_tokens", "kld_llamacpp", "kld_llamacpp_p99", "top1_llamacpp",
              "kld_first", "top1_first", "kld_all", "top1_all"):
        v = d.get(k)
        row[k] = v if k == "kld_n_tokens" or v is None else _r(v, 5 if k.startswith("kld") else 4)
    return row


# -- report.md ---------------------------------------------------------------------------------------
def _pct(v):
    return "—" if v is None else f"{v * 100:.1f} %"


def _ci(ci):
    return "—" if not ci or ci[0] is None else f"{ci[0] * 100:.1f} to {ci[1] * 100:.1f}"


def _points(v, ci):
    """A paired difference in percentage points with its interval: "-2.0 [-3.7, -0.3]"."""
    if v is None:
        return "—"
    return f"{v * 100:+.1f}" + ("" if not ci or ci[0] is None else f" [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]")


def _gen(s: dict) -> str:
    """The generated-answer accuracy with the replies that gave no single answer: "61.0 % (3 no answer)"."""
    cell = _pct(s.get("acc_gen"))
    return cell if s.get("acc_gen") is None or s.get("unparsed") is None else f"{cell} ({s['unparsed']} no answer)"


def _kld(v):
    return "—" if v is None else f"{v:.4f}"


def _p(v):
    return "—" if v is None else f"{v:.2g}"


def paired_cell(p: dict | None) -> str:
    if not p or not p.get("n"):
        return "—" + (f" ({p['excluded']} ids not paired: asked differently)" if p and p.get("excluded") else "")
    cell = f"+{p['gained']} / −{p['lost']}, {_points(p.get('diff'), p.get('diff_ci'))} points, p = {_p(p['mcnemar_p'])}"
    return cell + (f"; {p['excluded']} ids not paired (asked differently)" if p.get("excluded") else "")


def _mdd_cell(p: dict) -> str:
    mdd = p.get("mdd")
    if mdd is None:
        return "—"
    return f"{mdd * 100:.1f} points ({'resolves' if p.get('resolves') else 'does not resolve'} 1 point)"


def eval_setting(settings: dict) -> str:
    """How the items were drawn, shown and scored, in two sentences."""
    from edgemed.benchmarks.harness.datasets import PUBMEDQA_RULE

    files = settings.get("evals") or []
    counts = settings.get("eval_sizes") or [settings.get("eval_n")] * len(files)
    drawn = ", ".join(f"{n} from {Path(f).parent.name}/{Path(f).name}" for f, n in zip(files, counts)) or "none"
    ctx = "with its abstract" if settings.get("eval_context", True) else "question only"
    score = {"logits": "letter logits only (no generated answer)", "both": "letter logits and a generated answer"}
    return (f"Items: {drawn}; each the first n of a permutation seeded with {settings.get('seed')} (prefix-stable: a "
            f"larger n extends the same items). {PUBMEDQA_RULE[0].upper() + PUBMEDQA_RULE[1:]}; PubMedQA asked {ctx}. "
            f"Scored by {score.get(settings.get('eval_score', 'both'), 'letter logits and a generated answer')}.")


def _size(e: dict):
    """An entry's file size in MiB: the timing phase's, else the file's own where it is here."""
    size = e.get("model_bytes")
    if size is None:
        try:
            size = Path(e["path"]).stat().st_size
        except (OSError, KeyError, TypeError):
            return "—"
    return f"{size / 2**20:,.1f}"


def imatrix_markdown(results: dict, table) -> list[str]:
    """The importance-matrix on / off section: each ``<quant>-imatrix`` beside its plain ``<quant>``."""
    by_name = {e["name"]: e for e in results["configs"]}
    pairs = [(by_name[plain_of(e["name"])], e) for e in results["configs"] if plain_of(e["name"]) in by_name]
    if not pairs:
        return []
    rows, per = [], []
    for off, on in pairs:
        d_off, d_on = divergence_figures(off.get("divergence")), divergence_figures(on.get("divergence"))
        a_off, a_on = off.get("accuracy") or {}, on.get("accuracy") or {}
        arrow = lambda f, k: f"{f(d_off.get(k))} → {f(d_on.get(k))}"  # noqa: E731
        partial = " (accuracy partial)" if a_on.get("partial") or a_off.get("partial") else ""
        rows.append([off["name"] + partial, f"{_size(off)} → {_size(on)}", arrow(_kld, "kld_mean"), arrow(_kld, "kld_llamacpp"),
                     arrow(_pct, "top1"), f"{_pct(a_off.get('acc_logit'))} → {_pct(a_on.get('acc_logit'))}",
                     paired_cell(a_on.get("paired_vs_plain"))])
        sets = [(ds, s) for ds, s in (a_on.get("per_dataset") or {}).items()] + ([(POOLED, a_on)] if a_on.get("n") else [])
        for ds, s in sets:
            p = s.get("paired_vs_plain") or {}
            if not p.get("n"):
                continue
            s_off = a_off if ds == POOLED else (a_off.get("per_dataset") or {}).get(ds, {})
            per.append([on["name"], ds if ds != POOLED else "**pooled**", p["n"], _pct(s_off.get("acc_logit")),
                        _pct(s.get("acc_logit")), f"+{p['gained']} / −{p['lost']}", _pct(p.get("same_answer")),
                        _points(p.get("diff"), p.get("diff_ci")), _p(p.get("mcnemar_p")), _mdd_cell(p)])
    parts = ["## Importance matrix on / off\n",
             "Each `<type>-imatrix` artifact is `<type>` quantized with an importance matrix from the calibration "
             "text its conversion report names (`imatrix` section); off → on. KL divergence against "
             f"`{REFERENCE}` as above; accuracy by letter logits, paired on vs off on the same items (gained / lost "
             "= right only with / only without the matrix).\n",
             table(["type", "size MiB", "KLD", "KLD llama.cpp", "top-1", "acc (logits)", "paired, on vs off"], rows), ""]
    if per:
        parts += [table(["config", "set", "pairs", "acc off", "acc on", "gained / lost", "same answer",
                         "difference, points [95 % CI]", "McNemar p", "MDD"], per), ""]
    return parts


def markdown(results: dict, table) -> list[str]:
    """The accuracy-and-divergence section of report.md (``table(header, rows)`` renders a Markdown table)."""
    entries = [e for e in results["configs"] if e.get("accuracy") or e.get("divergence")]
    if not entries:
        return []
    rows, legacy = [], False
    for e in entries:
        a, d = e.get("accuracy") or {}, divergence_figures(e.get("divergence"))
        legacy = legacy or bool(d.get("legacy"))
        n = a.get("n")
        rows.append([e["name"], "—" if n is None else f"{n} (partial)" if a.get("partial") else n,
                     _pct(a.get("acc_logit")), _ci(a.get("ci_logit")), _gen(a),
                     "reference" if e["name"] == REFERENCE and n else paired_cell(a.get("paired_vs_reference")),
                     _kld(d.get("kld_mean")), _kld(d.get("kld_p99")), _pct(d.get("top1")),
                     _kld(d.get("kld_llamacpp")), _kld(d.get("kld_first")),
                     _kld(d.get("kld_all")) + (" ¹" if d.get("legacy") else "")])
    rule = next((divergence_figures(e.get("divergence")).get("rule") for e in entries
                 if divergence_figures(e.get("divergence")).get("rule")), None)
    parts = ["## Accuracy and divergence (measured on the benchmarked artifacts)\n",
             f"Accuracy pooled over every item of every set, by the answer letter's next-token logits (and by "
             f"parsing a generated answer where it was scored); 95 % Wilson intervals. {eval_setting(results.get('eval_settings') or results['settings'])}\n",
             f"Paired against `{REFERENCE}` on the same items (logits): items gained / lost, the difference in "
             "percentage points with its 95 % interval (Newcombe's hybrid score method for paired proportions) and "
             f"the exact McNemar p-value. KL divergence (nats) and top-1 agreement against `{REFERENCE}` on medical "
             "text; which positions each column covers: "
             + (f"{rule}.\n" if rule else "headline = every position except each passage's first; llama.cpp = "
                "positions n//2 .. n-2 of each n-token passage, as `llama-perplexity --kl-divergence` scores a "
                "window; first = the first positions alone; all = every position.\n"),
             table(["config", "items", "acc (logits)", "95 % CI", "acc (generated)", f"paired vs {REFERENCE}",
                    "KLD", "KLD p99", "top-1", "KLD llama.cpp", "KLD first pos.", "KLD all pos."], rows), ""]
    if any((e.get("accuracy") or {}).get("n_gen") for e in entries):
        parts += ["A generated reply that gives no single answer is wrong and counted as *no answer* beside its "
                  "accuracy: one with no answer line, a hedge that offers a second option on it ('Answer: C (or "
                  "possibly D)', 'Answer: C or D', 'Answer: C/D'), a correction or a second answer after it, or a reply "
                  "cut at the generation's token limit.\n"]
    differ = results.get("eval_settings_differ")
    if differ:  # accuracy results kept from runs with other settings: each described by its own
        parts += ["**The accuracy results were measured with different settings** (kept from earlier runs); only "
                  "items asked the same way are paired. Each configuration's:\n",
                  *(f"- `{name}`: {eval_setting(d)}" for name, d in differ.items()), ""]
    if legacy:
        parts += ["¹ measured before the headline rule: that raw file has only the every-position figure.\n"]
    thinking = [e["name"] for e in entries if (e.get("accuracy") or {}).get("thinking")]
    if thinking:
        parts += [f"{', '.join(f'`{n}`' for n in thinking)}: a reasoning model (its chat template opens a thought). "
                  "The answer letter's logits are read after that thought closed at once; a generated answer after "
                  "a thought capped at the generation's token limit and closed (as `edgemed run --think cap:N`), so "
                  "that accuracy depends on the limit.\n"]
    per = []
    for e in entries:
        a = e.get("accuracy") or {}
        sets = list((a.get("per_dataset") or {}).items()) + ([(POOLED, a)] if a.get("n") else [])
        for ds, s in sets:
            p = s.get("paired_vs_reference") or {}
            has = bool(p.get("n"))
            per.append([e["name"], ds if ds != POOLED else "**pooled**", s.get("n", "—"), _pct(s.get("acc_logit")),
                        _ci(s.get("ci_logit")), _gen(s),
                        f"+{p['gained']} / −{p['lost']}" if has else "—", _pct(p.get("same_answer")) if has else "—",
                        _points(p.get("diff"), p.get("diff_ci")) if has else "—",
                        _p(p.get("mcnemar_p")) if has else "—", _mdd_cell(p) if has else "—"])
    if per:
        parts += ["Per set and pooled. MDD: the smallest paired difference these items detect with 80 % power at "
                  "alpha = 0.05 given the measured share of discordant pairs (Connor 1987's McNemar sample-size "
                  "formula); a 1-point difference is resolvable where MDD <= 1 point.\n",
                  table(["config", "set", "items", "acc (logits)", "95 % CI", "acc (generated)", "gained / lost",
                         "same answer", "difference, points [95 % CI]", "McNemar p", "MDD"], per), ""]
    return parts + imatrix_markdown(results, table)
