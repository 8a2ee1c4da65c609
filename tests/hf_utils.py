"""Tiny Hugging Face models built locally with transformers' config classes (no downloads): one
per supported architecture, with a byte-level BPE tokenizer trained here."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .judge_utils import VERDICTS

VOCAB = 320  # the tokenizer's ids fill it; TP=2 pads it to 512 rows
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ("Yes", "No")  # regular (not special) added tokens, as real instruct vocabularies hold them
TEXT = (
    "The quick brown fox jumps over the lazy dog. Safety first: never share passwords. "
    "Paris is the capital of France. Water boils at 100 degrees Celsius at sea level. "
    "Yes no maybe. The judge reads a verdict after the answer prompt. "
) * 20


def write_tokenizer(directory: Path, *, adds_bos: bool) -> None:
    """A byte-level BPE tokenizer of exactly VOCAB ids; Llama-style (BOS added by its
    post-processor) when ``adds_bos``, Qwen-style (no BOS) otherwise."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", *VERDICTS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(WORDS),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TEXT], trainer)
    # The chat packs' verdict words, one token each; reserved tokens fill the vocabulary up (as
    # Llama-3's reserved special tokens do) when BPE made a word a token already.
    tokenizer.add_tokens([word for word in WORDS if tokenizer.token_to_id(word) is None])
    reserved = [f"<|reserved_{i}|>" for i in range(VOCAB - tokenizer.get_vocab_size())]
    tokenizer.add_special_tokens(reserved)
    assert tokenizer.get_vocab_size() == VOCAB, tokenizer.get_vocab_size()
    if adds_bos:
        bos = tokenizer.token_to_id("<|begin_of_text|>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)],
        )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>" if adds_bos else None,
        "eos_token": "<|end_of_text|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 128,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


def hf_config(arch: str, **overrides):
    """A tiny config of ``arch`` (GQA everywhere; Llama with 3.1's RoPE scaling and untied
    embeddings, Qwen tied; Qwen3 with a head dim that is not hidden / heads)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
    )
    if arch == "llama":
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        config = LlamaConfig(
            **{**common, "max_position_embeddings": 131072},
            rope_theta=500000.0,
            rope_scaling=rope,
            tie_word_embeddings=False,
        )
    elif arch == "qwen2":
        config = Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)
    elif arch == "qwen3":
        config = Qwen3Config(**common, head_dim=24, rope_theta=1000000.0, tie_word_embeddings=True)
    elif arch == "mistral":
        config = MistralConfig(
            **common,
            head_dim=16,
            sliding_window=None,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        )
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def make_hf_model(
    arch: str, directory: Path, *, seed: int = 0, max_shard_size: str = "40KB", **overrides
):
    """Saves a randomly initialised tiny ``arch`` model (fp32, sharded with an index) and its
    tokenizer to ``directory``; returns the model (eval mode). ``overrides``: config fields."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases, so a mapping mistake shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.eval()
    model.save_pretrained(str(directory), max_shard_size=max_shard_size)
    write_tokenizer(directory, adds_bos=arch in ("llama", "mistral"))
    return model
