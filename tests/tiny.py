"""Tiny random Llama / Qwen2 checkpoints with real byte-level BPE tokenizers, built in seconds.

The tokenizer is trained on a few medical sentences with the `tokenizers`
library, so conversion exercises the same code paths a real checkpoint does.
"""

from __future__ import annotations

from pathlib import Path

from conftest import need_converter

CORPUS = [
    "The patient presents with fever, cough and shortness of breath for three days.",
    "Blood pressure 150/95 mmHg, heart rate 110 bpm, SpO2 91% on room air.",
    "Start amoxicillin 500 mg three times daily for seven days; review in 48 hours.",
    "History of type 2 diabetes mellitus, hypertension and chronic kidney disease stage 3.",
    "Differential diagnosis includes pneumonia, pulmonary embolism and heart failure.",
    "Warfarin dose adjusted for INR 3.4; avoid NSAIDs and monitor for bleeding.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tokenizer(out: Path, style: str, vocab_size: int = 384):
    need_converter("tokenizers", "transformers")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:  # gpt-2 style byte-level regex
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, arch: str = "llama", seed: int = 0, tie: bool | None = None, vocab_size: int = 384,
                hidden_size: int = 64, max_position_embeddings: int = 256) -> Path:
    """Write a tiny random ``arch`` checkpoint (float32 safetensors + tokenizer) to ``out``; its trained context is
    ``max_position_embeddings`` (a context past it is refused, as for any model)."""
    need_converter("torch", "transformers", "tokenizers")
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, "qwen2" if arch == "qwen2" else "gpt2", vocab_size)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True if tie is None else tie, rope_theta=1_000_000.0)
    else:
        config = LlamaConfig(**common, tie_word_embeddings=False if tie is None else tie, rope_theta=10_000.0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is small; widen it so logits are informative
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out)
    return out


def build_lora(base: Path, out: Path, seed: int = 1, rslora: bool = False, r: int = 4, alpha: int = 8) -> Path:
    """A random PEFT LoRA adapter on attention and MLP projections (B non-zero, so it changes the model)."""
    need_converter("torch", "transformers", "peft")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(out)
    return out
