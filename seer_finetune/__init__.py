"""seer-finetune: long-context fine-tuning (YaRN + SeerAttention block sparsity) for Hugging Face LLMs.

`load_for_generation(path, density=..., threshold=...)` loads any folder a run writes, ready for `generate`
(`seer_finetune.seer.loading`); it is imported on first use, so importing the package stays cheap.
"""


def __getattr__(name: str):
    if name == "load_for_generation":
        from .seer.loading import load_for_generation

        return load_for_generation
    if name == "generate_texts":
        from .generation import generate_texts

        return generate_texts
    raise AttributeError(f"module 'seer_finetune' has no attribute {name!r}")
