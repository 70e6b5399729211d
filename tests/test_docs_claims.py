"""What the README and docs/ say about the commands matches the commands.

The docs are read as text; the commands as code: which command can open a connection is found from the imports its
callback reaches (statically, nothing is run), and every ``--option`` written beside an ``edgemed COMMAND`` is looked
up among that command's click parameters.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import textwrap
from pathlib import Path

import click
import pytest

from edgemed.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: where a figure may start: after a dash a digit leads (a range's upper end, "4-8") or after no word, dot, comma or
#: dash (not top-1's 1, Q4_K_M's 4, a minus sign's figure or 1.5's 5)
_AFTER_A_RANGES_DASH_OR_NO_WORD = r"(?:(?<=\d-)|(?<![\w.,-]))"

#: modules that open a connection or listen on one
NETWORK = ("requests", "urllib3", "httpx", "http.client", "urllib.request", "socket", "uvicorn")


def _commands(group: click.Group = cli, prefix: str = "") -> dict[str, click.Command]:
    """Every leaf command by its full name ("devices check")."""
    ctx = click.Context(group)
    found = {}
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            found.update(_commands(cmd, f"{prefix}{name} "))
        else:
            found[prefix + name] = cmd
    return found


def _imports(tree: ast.AST, package: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level
                    else node.module)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # a submodule imported by name


def _network_modules(roots) -> set[str]:
    """The network modules reached from ``roots`` through edgemed's own modules (imports at any depth of a module,
    function-level ones included: a command imports what it needs when it runs)."""
    seen, todo, hits = set(), list(roots), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if any(name == net or name.startswith(net + ".") for net in NETWORK):
            hits.add(name)
            continue
        if not name.startswith("edgemed."):
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None or not (spec.origin or "").endswith(".py"):
            continue
        package = name if spec.submodule_search_locations else name.rpartition(".")[0]
        todo.extend(_imports(ast.parse(Path(spec.origin).read_text(encoding="utf-8")), package))
    return hits


def network_commands() -> dict[str, set[str]]:
    """Each command whose callback reaches a network module, with the modules it reaches."""
    found = {}
    for name, cmd in _commands().items():
        callback = inspect.unwrap(cmd.callback)
        tree = ast.parse(textwrap.dedent(inspect.getsource(callback)))
        hits = _network_modules(_imports(tree, callback.__module__.rpartition(".")[0]))
        if hits:
            found[name] = hits
    return found


def _offline_sentence(path: Path) -> str:
    text = " ".join(path.read_text(encoding="utf-8").split())
    sentences = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z`])", text) if "reaches the network" in s]
    assert len(sentences) == 1, f"{path.name}: expected one sentence saying which commands reach the network"
    return sentences[0]


def test_the_search_finds_the_commands_known_to_connect():
    found = network_commands()
    assert {"push", "pull", "login", "serve"} <= set(found), found  # the search itself works
    assert "requests" in found["pull"] and "socket" in found["serve"]


def test_the_offline_sentence_names_every_command_that_opens_a_connection():
    found = set(network_commands())
    commands = set(_commands())
    for path in (ROOT / "README.md", ROOT / "docs" / "architecture.md"):
        sentence = _offline_sentence(path)
        named = {code.removeprefix("edgemed ") for code in re.findall(r"`([^`]+)`", sentence)} & commands
        missing = found - named
        assert not missing, f"{path.name} says no command reaches the network but leaves out {sorted(missing)}"


#: options of other programs the docs quote, with a name the page must also mention
FOREIGN_OPTIONS = {
    "--force-reinstall": "pip", "--no-cache-dir": "pip",
    "--signature": "model_signing", "--public_key": "model_signing", "--private_key": "model_signing",
    "--outtype": "convert_lora_to_gguf",
}
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


def _options(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} | {"--help"}


def _benchmark_options() -> set[str]:
    """Options the ``python -m edgemed.benchmarks...`` modules define (their parsers name them as string literals)."""
    found = set()
    for path in (ROOT / "benchmarks").rglob("*.py"):
        found.update(re.findall(r"[\"'](--[a-z][a-z0-9_-]*)[\"']", path.read_text(encoding="utf-8")))
    return found


def _code_and_prose(text: str) -> tuple[list[str], str]:
    """A page's code-block lines (a line ending in a backslash joined to the next; ``#`` comments cut) and the
    rest as one line of prose."""
    code, prose, in_block, carried = [], [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif not in_block:
            prose.append(line)
        else:
            line = line.split(" #")[0].rstrip()
            if line.endswith("\\"):
                carried += line[:-1] + " "
            else:
                code.append(carried + line)
                carried = ""
    return code, " ".join(" ".join(prose).split())


def _command_lines(spans, commands):
    """(command, options) for each ``edgemed COMMAND ...`` in the spans, up to the next ``|``, ``;`` or ``&&``."""
    names = "|".join(re.escape(n) for n in sorted(commands, key=len, reverse=True))
    start = re.compile(rf"(?<![\w./-])edgemed ({names})(?![\w-])")
    for span in spans:
        for piece in re.split(r"\s(?:\||;|&&|\|\|)\s|\$\(", span):
            match = start.search(piece)
            if match:
                yield match.group(1), _OPTION.findall(piece[match.end():])


def test_options_written_beside_a_command_are_that_commands():
    commands = _commands()
    wrong, seen = [], 0
    for path in DOCS:
        code, prose = _code_and_prose(path.read_text(encoding="utf-8"))
        for name, options in _command_lines(code + re.findall(r"`([^`]+)`", prose), commands):
            seen += len(options)
            wrong += [f"{path.name}: edgemed {name} {o}" for o in options if o not in _options(commands[name])]
    assert seen > 50  # the pages were read: the README alone writes dozens
    assert not wrong, f"options the commands do not have: {wrong}"


def test_every_option_the_docs_name_exists():
    known = set().union(*map(_options, _commands().values())) | _benchmark_options()
    unknown = []
    for path in DOCS:
        code, prose = _code_and_prose(text := path.read_text(encoding="utf-8"))
        for option in sorted(set(_OPTION.findall(" ".join(code) + " " + prose)) - known):
            if FOREIGN_OPTIONS.get(option, "\0") not in text:
                unknown.append(f"{path.name}: {option}")
    assert not unknown, f"options no edgemed command, benchmark or named tool has: {unknown}"


def _csv_row(folder: str, config: str) -> dict:
    import csv

    with open(ROOT / "benchmarks" / "results" / folder / "results.csv", newline="", encoding="utf-8") as f:
        return next(row for row in csv.DictReader(f) if row["config"] == config)


def _paper_claim_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### The paper's claim, reproduced here", 1)[1].split("\n### ", 1)[0]
    return " ".join(section.split())


def test_the_paper_claim_gives_each_runs_ttft_beside_its_end_to_end_latency():
    """The paper's latency figure is end to end; the README says so and puts the first-token latency of every
    reproduce run beside it, as its results.csv has it."""
    section = _paper_claim_section()
    assert "end to end" in section
    for folder in ("reproduce-qwen2.5-1.5b", "reproduce-qwen2.5-1.5b-load-mode", "reproduce-r1-distill-qwen-7b-shaped"):
        f16, q4 = (float(_csv_row(folder, c)["ttft_ms_p50"]) for c in ("f16", "q4_k_m"))
        change = f"{(q4 / f16 - 1) * 100:+.1f} %"
        quoted = f"{q4:,.1f} against {f16:,.1f} ms"
        assert quoted in section, f"{folder}: README lacks Q4_K_M's and F16's TTFT p50 ({quoted})"
        assert change in section, f"{folder}: README lacks the TTFT change {change}"


def _step_timings(step: str) -> set[float]:
    """Every ``timings_s[step]`` and its ``total`` in the kept result files (conversion reports and
    convert_cost/convert_memory JSON), to 0.1 s."""
    import json

    found = set()

    def walk(node):
        if isinstance(node, dict):
            timings = node.get("timings_s")
            if isinstance(timings, dict) and step in timings:
                found.update(round(float(timings[k]), 1) for k in (step, "total") if k in timings)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in (ROOT / "benchmarks" / "results").rglob("*.json"):
        walk(json.loads(path.read_text(encoding="utf-8")))
    return found


def test_the_imatrix_cost_the_readme_quotes_is_in_a_kept_result():
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    sentence = text.split("It adds a pass over 8,192 tokens", 1)[1].split("`--imatrix-from FILE`", 1)[0]
    quoted = [float(n) for pair in re.findall(r"(\d[\d.]*)(?:-(\d[\d.]*))? s\b", sentence) for n in pair if n]
    assert len(quoted) >= 3, sentence
    kept = _step_timings("imatrix")
    assert not [q for q in quoted if q not in kept], f"imatrix timings with no result file: {quoted} vs {sorted(kept)}"


def test_no_page_counts_a_test_files_tests():
    """A test count beside a test file's name is stale at the next test added; the file says it better."""
    counted = [f"{path.name}: {m.group()}" for path in DOCS
               for m in re.finditer(r"\b\d+ tests\b[^.;)]*", path.read_text(encoding="utf-8"))]
    assert not counted, counted


def test_the_adapter_memory_ratios_quoted_are_in_the_results():
    """Every ratio decision 0014 and the serve page quote for four adapters' memory is one a serve_adapters result
    prints (a range's ends included)."""
    printed = set()
    for path in (ROOT / "benchmarks" / "results" / "serve_adapters").glob("*.md"):
        printed.update(re.findall(r"\b1\.\d{3}x", path.read_text(encoding="utf-8")))
    pages = [ROOT / "docs" / "decisions" / "0014-trim-the-heap-when-idle.md", ROOT / "docs" / "serve.md"]
    quoted = []
    for path in pages:
        text = path.read_text(encoding="utf-8")
        if path.name == "serve.md":
            text = text.split("(`malloc_trim`", 1)[1].split("decision 0014", 1)[0]
        for low, high in re.findall(r"\b(1\.\d{3})(?:x?(?: to |-)(1\.\d{3}))?x", text):
            quoted += [f"{low}x"] + ([f"{high}x"] if high else [])
    assert len(quoted) >= 8
    assert not [q for q in quoted if q not in printed], sorted(set(quoted) - printed)


def _decisions() -> list[Path]:
    return sorted((ROOT / "docs" / "decisions").glob("0*.md"))


def test_a_superseded_record_names_the_record_that_supersedes_it():
    """The decisions README's rule: a record that is overturned, even in part, stays, and its status names the
    record that replaces it."""
    status = {path.name[:4]: path.read_text(encoding="utf-8").split("\n\n", 2)[1] for path in _decisions()}
    pairs = [(path.name[:4], old) for path in _decisions()
             for old in re.findall(r"Supersedes[^\[]*\[(\d{4})\]", path.read_text(encoding="utf-8"))]
    assert pairs  # 0012 supersedes part of 0006
    assert not [(new, old) for new, old in pairs if new not in status[old]], pairs


def _code_constants() -> dict[str, set[float]]:
    """Module-level numeric constants of edgemed and converters, by name."""
    found: dict[str, set[float]] = {}
    for base in ("edgemed", "converters"):
        for path in (ROOT / base).rglob("*.py"):
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                        and type(node.value.value) in (int, float):
                    for target in node.targets:
                        if isinstance(target, ast.Name) and target.id.isupper():
                            found.setdefault(target.id, set()).add(float(node.value.value))
    return found


def test_constants_the_docs_give_as_decided_are_the_codes():
    """`NAME` = VALUE in the README, the topic pages and a decision's status and Decision section (not its
    measurements, where other values were tried) is the value in the code."""
    texts = {path.name: path.read_text(encoding="utf-8") for path in DOCS}
    for path in _decisions():
        text = path.read_text(encoding="utf-8")
        decided = text.split("\n## Decision", 1)[1].split("\n## ", 1)[0] if "\n## Decision" in text else ""
        texts[path.name] = text.split("\n## ", 1)[0] + decided
    constants = _code_constants()
    pattern = re.compile(r"`([A-Z][A-Z0-9_]+)`\s*=\s*(\d[\d.]*)|`([A-Z][A-Z0-9_]+) = (\d[\d.]*)`")
    written = [(m[1] or m[3], page, float((m[2] or m[4]).rstrip(".")))
               for page, text in texts.items() for m in pattern.finditer(text)]
    written = [w for w in written if w[0] in constants]
    assert len(written) >= 3  # the prefill budget's and the headline KLD's
    wrong = [f"{page}: {name} = {value:g} (code: {sorted(constants[name])})" for name, page, value in written
             if value not in constants[name]]
    assert not wrong, wrong


def _blocks(text: str) -> list[str]:
    """A page's paragraphs and list items, each as one line."""
    blocks, current = [], []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("- ", "| ", "#")):
            if current:
                blocks.append(" ".join(current))
            current = [line.strip()] if line.strip() else []
        else:
            current.append(line.strip())
    return blocks + ([" ".join(current)] if current else [])


def test_a_plan_from_an_older_planner_is_quoted_with_its_planner():
    """A ``plan_devices`` result made by a planner other than the current one is named, wherever the docs cite it,
    with the planner that made it."""
    import json

    from edgemed.runtime.plan import METHOD

    old = {}
    for path in (ROOT / "benchmarks" / "results").glob("plan_devices-*.json"):
        method = json.loads(path.read_text(encoding="utf-8"))["method"]
        if method != METHOD:
            old[path.stem] = method
    pages = DOCS + _decisions()
    unlabelled = [f"{page.name}: {stem} ({method})" for page in pages
                  for block in _blocks(page.read_text(encoding="utf-8"))
                  for stem, method in old.items() if stem in block and f"`{method}`" not in block]
    assert not unlabelled, unlabelled


def test_the_verify_cost_the_readme_quotes_is_verify_cost_json():
    import json

    result = json.loads((ROOT / "benchmarks" / "results" / "verify_cost.json").read_text(encoding="utf-8"))
    kept = {f"{v:g}" for v in result.values() if isinstance(v, (int, float))} | {f"{result['size_bytes'] / 1e9:.1f}"}
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    paragraph = text.split("Verify cost (", 1)[1].split("###", 1)[0]
    number = (_AFTER_A_RANGES_DASH_OR_NO_WORD  # 5.42x counts
              + r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+|\d{3,})(?![\d.,]|[A-Za-wyz_])")
    figures = [n.replace(",", "") for n in re.findall(number, paragraph)]
    assert len(figures) >= 5, paragraph
    assert not [f for f in figures if f not in kept], (figures, sorted(kept))


def test_the_parity_figures_the_readme_quotes_are_the_convert_cost_jsons():
    import json

    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    paragraph = text.split("## Measured here", 1)[1].split("## ", 1)[0]
    names = re.findall(r"convert_cost-\*-parity-table\.json|-quickstart-shape-quiet\.json", paragraph)
    assert len(names) == 2, paragraph
    results = [*(ROOT / "benchmarks" / "results").glob("convert_cost-*-parity-table.json"),
               *(ROOT / "benchmarks" / "results").glob("convert_cost-*-quickstart-shape-quiet.json")]
    assert len(results) == 4
    for path in results:
        parity = json.loads(path.read_text(encoding="utf-8"))["runs"]["convert+parity"]["parity"]
        assert f"{parity['nmse']:.3e}" in paragraph, path.name
        assert f"{parity['top1'] * 100:.1f} %".replace(".0 %", " %") in paragraph, path.name


def test_the_serve_slots_plan_error_the_runtime_page_quotes_is_the_jsons():
    import json

    rows = json.loads((ROOT / "benchmarks" / "results" / "plan_memory-serve-4slots.json").read_text())["rows"]
    errors = sorted(abs(r["error_pct"]) for r in rows)
    text = " ".join((ROOT / "docs" / "runtime.md").read_text(encoding="utf-8").split())
    sentence = text.split("4 slots of 2,048 tokens", 1)[1].split("`)", 1)[0]
    assert f"{errors[0]:.1f}-{errors[-1]:.1f} %" in sentence and "plan_memory-serve-4slots.json" in sentence
    assert not re.findall(r"\d+-\d+ %", sentence.replace(f"{errors[0]:.1f}-{errors[-1]:.1f} %", ""))


def test_the_amx_buffer_decision_0019_quotes_is_what_the_planner_reads():
    """0019's AMX buffer (llama.cpp's log on the AMX host, kept in no result file) is checked against the tensor
    table, which any box reads: ``plan.read_shape`` of the same 1.5B file."""
    from edgemed.converters.source import pip_models

    from edgemed.errors import InputError
    from edgemed.runtime.plan import MIB, read_shape

    try:
        path = pip_models.gguf_file("qwen2.5-1.5b-instruct")
    except InputError as exc:
        pytest.skip(f"real model 'qwen2.5-1.5b-instruct' not installed: {exc.fix}")
    shape = read_shape(path)
    text = " ".join((ROOT / "docs" / "decisions" / "0019-amx-where-the-build-runs-it.md").read_text().split())
    amx, extra = shape.amx_bytes / MIB, shape.amx_extra_bytes / MIB
    for figure in (f"{amx:.2f} MiB", f"{extra:.2f} MiB", f"{amx + extra:.2f} MiB", f"{shape.weights_bytes / MIB:,.2f} MiB"):
        assert figure in text, figure


RESULTS = ROOT / "benchmarks" / "results"


def _table_rows(text: str, after: str) -> list[list[str]]:
    """The cells of each body row of the first table whose header follows the text ``after`` (or holds it)."""
    lines = text.split(after, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|---"))
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _figures(text: str) -> list[str]:
    """The decimal figures of ``text`` (thousands commas dropped, both ends of a range: "4-8" is 4 and 8), leaving out
    code spans, link targets and a figure a dash joins to a word (top-1) or that a minus sign leads."""
    text = re.sub(r"`[^`]*`|\]\([^)]*\)", " ", text)
    number = (_AFTER_A_RANGES_DASH_OR_NO_WORD  # 5.42x counts
              + r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:e[-+]\d+)?)(?!\d|[.,]\d|[A-Za-wyz_])")
    return [n.replace(",", "") for n in re.findall(number, text)]


def test_figures_are_both_ends_of_a_range_and_no_name_or_sign():
    """A check built on ``_figures`` sees a range's upper end too ("4-8" was read as 4 alone), and still leaves out a
    figure a dash or an underscore joins to a word and the figure a minus sign leads."""
    assert _figures("1.8-7.6 at start, +2,938-3,460 MiB, 4-8 GiB") == ["1.8", "7.6", "2938", "3460", "4", "8"]
    assert _figures("top-1 3.6 %, Q4_K_M, -1.9 %, NMSE 1.140e-06, `--threads 2`") == ["3.6", "1.140e-06"]

def test_the_convert_cost_parity_table_is_its_jsons():
    """Each row of convert_cost.md's parity table names its result, and every figure in the row is that JSON's."""
    import json

    rows = _table_rows((RESULTS / "convert_cost.md").read_text(encoding="utf-8"), "## Parity and size of converted files")
    assert len(rows) == 4, rows
    for model, output, parity, size, result in rows:
        name = re.search(r"\((convert_cost-[\w.+-]+\.json)\)", result)
        assert name, result
        run = json.loads((RESULTS / name[1]).read_text(encoding="utf-8"))["runs"]["convert+parity"]
        p = run["parity"]
        assert p["passed"] and output.split(",")[0].lower() == p["out_type"], (output, name[1])
        kept = {f"{p['nmse']:.3e}", f"{p['kld']:.3e}", f"{p['top1'] * 100:.1f}", str(p["n_positions"]),
                f"{run['output_bytes'] / 1e6:.0f}", "576"}  # d=576: the model's width, named for its Q5_0 fallback
        quoted = _figures(f"{parity} {size}")
        assert len(quoted) >= 5, (parity, size)
        assert not [f for f in quoted if f not in kept], (name[1], quoted, sorted(kept))


def test_the_verify_cost_page_is_verify_cost_json():
    import json

    result = json.loads((RESULTS / "verify_cost.json").read_text(encoding="utf-8"))
    kept = {f"{v:g}" for v in result.values() if isinstance(v, (int, float))}
    rows = _table_rows((RESULTS / "verify_cost.md").read_text(encoding="utf-8"), "`python -m edgemed.benchmarks.verify_cost`")
    quoted = [f for _, cost in rows for f in _figures(cost)]
    assert len(quoted) >= 10, rows
    assert not [f for f in quoted if f not in kept], (quoted, sorted(kept))
    assert len(rows[0]) == 2, "one column of figures: the run verify_cost.json keeps"


def test_the_plan_memory_tables_are_their_jsons():
    """Every predicted and measured MiB and every error in plan_memory.md's two tables is its JSON row's, row for
    row, and the tables have no other columns of figures."""
    import json

    text = (RESULTS / "plan_memory.md").read_text(encoding="utf-8")
    for after, result in (("| `python -m edgemed.benchmarks.plan_memory`", "plan_memory.json"),
                          ("`edgemed serve` plans 4 slots", "plan_memory-serve-4slots.json")):
        rows = json.loads((RESULTS / result).read_text(encoding="utf-8"))["rows"]
        table = _table_rows(text, after)
        assert len(table) == len(rows), (result, table)
        for cells, row in zip(table, rows):
            mib = 1024 * 1024
            assert cells[1:4] == [f"{row['predicted'] / mib:,.1f} MiB", f"{row['measured'] / mib:,.1f} MiB",
                                  f"{row['error_pct']:+.1f} %"], (result, cells, row["model"], row["n_ctx"])
            assert not _figures(" ".join(cells[4:]).replace(str(row.get("load_mode")), "")), (result, cells)
