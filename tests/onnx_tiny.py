"""A tiny random Qwen2 checkpoint for the ONNX tests, built in seconds.

hidden 64, 2 layers, 4 heads / 2 KV heads, a byte-level BPE tokenizer of 300
tokens trained here with ``tokenizers``, a ChatML template. LM-head rows of
tokens that do not decode to printable ASCII are zeroed, so greedy output is
readable text (the tests compare strings) while the model stays random.
"""

from __future__ import annotations

from pathlib import Path

from conftest import need_converter

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: the split of Qwen2's tokenizer (transformers' ``Qwen2Tokenizer``)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
CORPUS = [
    "The patient has type 2 diabetes and hypertension; start metformin 500 mg twice daily.",
    "Community-acquired pneumonia is treated with amoxicillin; check the oxygen saturation.",
    "Warfarin raises the INR when given with trimethoprim-sulfamethoxazole.",
] * 40


def build(out: Path, *, seed: int = 0, tie: bool = False) -> Path:
    """``tie``: the LM head is the embedding table (tie_word_embeddings), as in SmolLM2 and Qwen2.5-0.5B."""
    need_converter("torch", "transformers", "tokenizers")
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    # Qwen2's own pre-tokenizer (digits one by one), as transformers builds it for a qwen2 model_type whatever the
    # saved tokenizer.json says: the file the ONNX engine reads then splits text as the source's tokenizer does
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    eos = tok.token_to_id("<|im_end|>")
    cfg = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, eos_token_id=eos, bos_token_id=tok.token_to_id("<|endoftext|>"),
                      pad_token_id=tok.token_to_id("<|endoftext|>"))
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for tid in range(cfg.vocab_size):
            text = tok.decode([tid])
            if tid == eos or not (text.isascii() and text.isprintable() and text):
                model.lm_head.weight[tid] = 0.0
            else:
                model.lm_head.weight[tid] *= 20.0
    model.save_pretrained(out)
    return out


def set_external(graph: Path, key: str, value: str) -> None:
    """The ``key`` entry (location, offset, length) of the graph's first externally stored tensor set to ``value``,
    as a hand-edited or damaged graph could say it; the data file is left as it is."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    first = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entry = next((e for e in first.external_data if e.key == key), None) or first.external_data.add(key=key)
    entry.value = value
    graph.write_bytes(model.SerializeToString())


def add_lora(base: Path, out: Path, *, seed: int = 1) -> Path:
    """A PEFT LoRA adapter on q/v/down projections with non-zero B (so it changes the logits)."""
    need_converter("torch", "transformers", "peft")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.5)
    peft_model.save_pretrained(out)
    return out
