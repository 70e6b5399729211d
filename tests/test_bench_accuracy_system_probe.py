"""The accuracy harness learns whether the model's chat template takes a system role once per run
(``accuracy._Prepared.messages``: ``probe_system_role`` at the first item), not again for each item with the item's
system text (``chat_template.fold_system`` rendered the chat template two to four times more per item, twice an item:
the context check and the scoring). The prompts are byte for byte the ones ``fold_system`` made, item by item, for
every chat template the serve tests have (with a system role, one that refuses it, one that drops it, Qwen2.5's own
default system message, one whose default is the probe's text, R1-Distill's, a Hermes tools template). The real
sandboxed renderer over a scripted scorer; no model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_bench_accuracy_scoring import ITEM
from test_serve_system_renders import CHAT_TEMPLATES
from test_template_system_fold import TemplatedScorer

from edgemed.benchmarks.harness import accuracy
from edgemed.benchmarks.harness.datasets import Item
from edgemed.runtime.chat_template import fold_system, probe_system_role, render

ITEMS = [
    ITEM,
    Item("medqa:2", "medqa", "Which drug reverses heparin?", {"A": "Vitamin K", "B": "Protamine", "C": "Naloxone",
                                                                "D": "Flumazenil"}, "B"),
    Item("medmcqa:3", "medmcqa", "Deficiency of which vitamin causes night blindness?",
         {"A": "Vitamin A", "B": "Vitamin C", "C": "Vitamin D", "D": "Vitamin E"}, "A"),
    Item("pubmedqa:4", "pubmedqa", "Does early mobilisation shorten hospital stay after hip fracture?",
         {"A": "yes", "B": "no", "C": "maybe"}, "A",
         context="Patients mobilised within 24 hours had a shorter median stay than those mobilised later."),
]


class CountingScorer(TemplatedScorer):
    """Renders with a real chat template and counts the renders; what ``accuracy.evaluate`` reads of a scorer."""

    def __init__(self, chat_template: str, path: Path):
        super().__init__(chat_template)
        self.path, self.n_ctx, self.renders = path, 1 << 20, 0

    def render(self, messages):
        self.renders += 1
        return super().render(messages)


def _as_before(chat_template: str, tpl, inputs: dict) -> str:
    """The prompt as the harness rendered it with ``fold_system`` for each item."""
    def rendered(messages):
        return render(chat_template, messages)

    return rendered(fold_system(rendered, tpl.messages(inputs))[0])


@pytest.mark.parametrize("name", CHAT_TEMPLATES)
def test_each_item_gets_the_prompt_fold_system_made(name, tmp_path):
    chat_template = CHAT_TEMPLATES[name]
    scorer = CountingScorer(chat_template, tmp_path / "m.gguf")
    prepared = accuracy._Prepared(scorer)
    for item in ITEMS * 2:
        tpl, cue = prepared.template(accuracy.template_for(item, "auto"))
        inputs = accuracy.template_inputs(tpl, item)
        assert accuracy._asked(prepared, tpl, cue, inputs)[0] == _as_before(chat_template, tpl, inputs), item.id


@pytest.mark.parametrize("name", ["system-role", "refuses", "drops", "qwen-default", "r1-distill"])
def test_a_run_probes_the_chat_template_once(name, tmp_path):
    """Each item renders its prompt twice (the context check, the scoring) and nothing more: the probe is the run's,
    once. Each item probed the chat template again, twice, with its own system text."""
    artifact = tmp_path / "m.gguf"
    artifact.write_bytes(b"GGUF")
    probe = CountingScorer(CHAT_TEMPLATES[name], artifact)
    probe_system_role(probe.render)
    assert probe.renders >= 2  # what one probe costs this template
    for n, items in enumerate((ITEMS[:1], ITEMS, ITEMS * 3)):
        items = [Item(f"{it.id}-{k}", it.dataset, it.question, it.options, it.answer, it.context)
                 for k, it in enumerate(items)]
        scorer = CountingScorer(CHAT_TEMPLATES[name], artifact)
        accuracy.evaluate(scorer, items, records_path=tmp_path / f"records-{n}.jsonl", score="logits",
                          progress=False, artifact_sha256="0" * 64)
        assert scorer.renders == probe.renders + 2 * len(items), len(items)
