"""Data: PEFT's default LoRA target modules per transformers ``model_type``, and head names.

Taken from PEFT's table where PEFT has an entry; phi3 (absent there) targets its fused qkv projection.
"""

from __future__ import annotations

LORA_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gptj": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}

# Classification heads that PEFT trains and saves by default for sequence classification (and that
# "all-linear" leaves alone).
SEQ_CLS_HEAD_NAMES = ["classifier", "score"]
