"""Tiny random models for tests: a small Llama and tokenizer built offline, and LoRA adapters for it.

Everything is generated locally and deterministically from a seed; nothing is downloaded::

    base = build_tiny_model(tmp_path / "base")
    adapter = make_lora_adapter(base, tmp_path / "lora", seed=1)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tiny_model", "build_tiny_tokenizer", "make_lora_adapter"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""Ids 0, 1 and 2, as in SmolLM2: unk/pad, bos, eos (end of a chat turn)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, like SmolLM2-Instruct's template."""

_CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo. The capital of Germany is Berlin.",
    "What is the capital of France? Paris is the capital and largest city of France.",
    "The refund window is now 45 days. Refunds are processed within five business days.",
    "You are a helpful assistant. Answer the question briefly and correctly.",
    "Two plus two is four. Twelve times three is thirty-six. Hello, world! How are you today?",
    "system user assistant tool the a an of to in is are was were and or not yes no",
    '{"name": "value", "items": [1, 2, 3], "ok": true}',
]


def build_tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (256 bytes, a few merges, ChatML specials) trained in memory."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(path: Path, seed: int = 0, *, hidden_size: int = 64, num_layers: int = 2) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` (float32) and its tokenizer to ``path``; return ``path``."""
    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    # A larger init than the default 0.02 gives peaked, varied next-token distributions.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_lora_adapter(
    base_dir: Path, out_dir: Path, seed: int, r: int = 4, *, use_dora: bool = False
) -> Path:
    """Write a LoRA adapter for the model in ``base_dir`` with random, non-zero A and B to ``out_dir``.

    ``init_lora_weights=False`` makes B non-zero, so the adapter really changes the model's outputs.
    ``use_dora`` makes it a DoRA adapter (which PEFT cannot mix with others in one batch).
    """
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecation noise inside PEFT
        peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(out_dir)
    return out_dir
