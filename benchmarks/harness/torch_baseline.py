"""The Hugging Face baseline: the source checkpoint under torch (fp32 / bf16 on CPU, fp16 on a GPU).

The only place the harness uses torch. Same prompt text through the tokenizer's
own chat template, greedy, end-of-generation masked, the same fixed token count
as every other configuration; a manual loop over ``model(...)`` with its KV cache
(``past_key_values``), so a timestamp is taken as each token is known, exactly
as for the other runtimes.
"""

from __future__ import annotations

import time
from pathlib import Path

from edgemed.benchmarks.harness.roofline import WeightFacts
from edgemed.errors import InputError


class HfTimed:
    def __init__(self, path: Path, threads: int | None, dtype: str, seed: int, allow_pickle: bool = False,
                 n_ctx: int = 2048):
        from edgemed import env

        env.enforce_offline()  # before transformers is imported: huggingface_hub reads it at its import
        import torch
        from transformers import AutoTokenizer

        from edgemed.converters.source.checkpoint import Checkpoint

        if threads:
            torch.set_num_threads(int(threads))
        torch.manual_seed(seed)
        self.torch = torch
        self.n_ctx = n_ctx  # the run's --ctx: the same prompts fit it, or are refused, for every configuration
        self.device = "cuda" if dtype == "float16" and torch.cuda.is_available() else "cpu"
        if dtype == "float16" and self.device == "cpu":
            raise InputError("The hf-fp16 baseline needs a GPU, and torch sees none.", "use --baselines hf-fp32,hf-bf16 on a CPU")
        ckpt = Checkpoint.open(path, allow_pickle=allow_pickle)  # pickle-only weights need the user's --allow-pickle
        self.n_ctx_train = ckpt.hparam("max_position_embeddings", required=False)  # None where config.json names none
        t = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = ckpt.hf_model(dtype=getattr(torch, dtype)).to(self.device).eval()
        self.load_s = time.perf_counter() - t
        self.dtype, self.threads = dtype, torch.get_num_threads()
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.banned = torch.tensor(sorted(eos), dtype=torch.long, device=self.device)

    def prompt_ids(self, text: str) -> list[int]:
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def _pick(self, logits) -> int:
        logits = logits.float()
        if len(self.banned):
            logits[self.banned] = float("-inf")
        return int(logits.argmax())

    def generate(self, ids: list[int], n: int):
        torch = self.torch
        stamps, out = [], []
        with torch.inference_mode():
            t0 = time.perf_counter()
            x = torch.tensor([ids], dtype=torch.long, device=self.device)
            result = self.model(input_ids=x, use_cache=True)
            for i in range(n):
                token = self._pick(result.logits[0, -1])
                stamps.append(time.perf_counter())
                out.append(token)
                if i < n - 1:
                    x = torch.tensor([[token]], dtype=torch.long, device=self.device)
                    result = self.model(input_ids=x, past_key_values=result.past_key_values, use_cache=True)
        return t0, stamps, out

    def weights(self) -> WeightFacts:
        from edgemed.benchmarks.harness.roofline import torch_facts

        return torch_facts(self.model)

    def settings(self) -> dict:
        return {"n_threads": self.threads, "dtype": self.dtype, "device": self.device,
                "torch": self.torch.__version__}

    def close(self) -> None:
        self.model = None


def open_hf(path: Path, threads, n_ctx, profile, seed, dtype="float32", allow_pickle=False):
    return HfTimed(path, threads, dtype or "float32", seed, allow_pickle, n_ctx)
