"""A tiny Llama base model and byte-level BPE tokenizer, built from config with no hub access.

Used by the demo and the tests; it is saved in Hugging Face format, so it is loaded by the
same code path as a user's real base model.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "LoRA trains two small matrices, A and B, beside each frozen weight.",
    "Question: what is the capital of France? Answer: Paris.",
    "<|user|>\nhello<|end|>\n<|assistant|>\nHello! How can I help?<|end|>\n",
    "def add(a, b):\n    return a + b\n",
    "0123456789 + - * / = ( ) [ ] { } , . ; : ! ?",
]


def build_tokenizer(vocab_size: int = 512):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Every byte in the alphabet: any text tokenizes, nothing maps to <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_base(
    path: Path, hidden_size: int = 64, layers: int = 2, heads: int = 4, seed: int = 0
) -> Path:
    """Writes a randomly initialised tiny Llama and its tokenizer to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    """`python -m workers.tiny_base DIR`: the demo builds its base in a process of its own,
    so that nothing under api/ imports the training stack."""
    import sys

    build_tiny_base(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
