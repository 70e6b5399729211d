"""The medical prompts both sides of every parity check see: the source (``layered``) and the output (``parity``).

Five short clinical passages (a management step, a question, a fact, a drug interaction, a triage note),
about 150 positions with SmolLM2's tokenizer; every position is scored, not only the last.
"""

PROMPTS = (
    "A 58-year-old woman with type 2 diabetes presents with polyuria and a fasting glucose of 230 mg/dL. The next step in management is",
    "Question: Which drug is first-line for uncomplicated hypertension in a patient with chronic kidney disease and albuminuria?\nAnswer:",
    "The most common cause of community-acquired pneumonia in adults is Streptococcus pneumoniae, which",
    "Warfarin interacts with many antibiotics. For example, trimethoprim-sulfamethoxazole increases the INR because",
    "Triage note: 72 y/o male, sudden onset left-sided weakness and slurred speech 45 minutes ago. BP 182/104. Priority:",
)
