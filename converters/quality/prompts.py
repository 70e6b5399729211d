"""The medical prompts both sides of every parity check see: the source (``layered``) and the output (``parity``).

Five short clinical passages (a management step, a question, a fact, a drug interaction, a triage note),
about 150 positions with SmolLM2's tokenizer; every position is scored, not only the last. Then ``CHAT``, one
user turn and its answer rendered with the source's own chat template: the special tokens a chat is written in
(``<|im_start|>``, ``<|im_end|>``, ...) go through the model, and the position after the answer predicts the
end-of-turn token, so a file that mangles those tokens' rows fails the gate as a chat would.
"""

PROMPTS = (
    "A 58-year-old woman with type 2 diabetes presents with polyuria and a fasting glucose of 230 mg/dL. The next step in management is",
    "Question: Which drug is first-line for uncomplicated hypertension in a patient with chronic kidney disease and albuminuria?\nAnswer:",
    "The most common cause of community-acquired pneumonia in adults is Streptococcus pneumoniae, which",
    "Warfarin interacts with many antibiotics. For example, trimethoprim-sulfamethoxazole increases the INR because",
    "Triage note: 72 y/o male, sudden onset left-sided weakness and slurred speech 45 minutes ago. BP 182/104. Priority:",
)

#: A finished exchange (the answer's end-of-turn token included), rendered by ``chat_text``.
CHAT = (
    {"role": "user", "content": "Which drug is first-line for type 2 diabetes in an adult with normal kidney function?"},
    {"role": "assistant", "content": "Metformin, started at a low dose with meals to limit stomach upset."},
)


def chat_text(tok) -> str | None:
    """``CHAT`` as the Hugging Face tokenizer ``tok``'s own chat template writes it; None without a template."""
    if not getattr(tok, "chat_template", None):
        return None
    return tok.apply_chat_template(list(CHAT), tokenize=False)


def token_lists(tok, prompts=None, max_tokens: int | None = None) -> list[list[int]]:
    """The token ids the gate compares: ``prompts`` (default ``PROMPTS``) with the tokenizer's own BOS/EOS rule, and, by default, ``CHAT`` as its template renders it (special tokens parsed, no BOS added on top: the
    template writes the ones it wants, as ``apply_chat_template`` tokenizes). ``max_tokens``: each list cut to this
    (a model's trained context)."""
    ids = [tok(text, add_special_tokens=True)["input_ids"] for text in (PROMPTS if prompts is None else prompts)]
    chat = chat_text(tok) if prompts is None else None
    if chat is not None:
        ids.append(tok(chat, add_special_tokens=False)["input_ids"])
    return [t[:max_tokens] for t in ids] if max_tokens else ids
