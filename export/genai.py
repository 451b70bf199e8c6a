"""`genai_config.json`: what onnxruntime-genai needs to run an export of `slimlm export onnx` unchanged.

onnxruntime-genai (the ONNX Runtime project's generation library: `og.Model(OUT)`, `og.Generator`) reads a model
folder holding the graph, the tokenizer files and this config: the graph's input and output names, the cache
geometry, the context length, and the default search. Two entries are not the Hugging Face config's:

- `num_hidden_layers` is the number of attention layers in the graph, i.e. of cache entries: an FFN replacement
  slot of a compressed model has no cache (config.json still counts it as a layer).
- `context_length` is the rotary table's rows for a fused-attention graph (positions stop there), else the
  model's `max_position_embeddings`.

The cache is passed from step to step as the graph returns it (`past_present_share_buffer` false): the graphs
concatenate, they do not write into a fixed buffer. Checked by the tests where onnxruntime-genai is installed:
its greedy tokens equal `OnnxCausalLM`'s.
"""

from __future__ import annotations

FILE = "genai_config.json"
# model_type -> onnxruntime-genai's model type
TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
         "gemma3_text": "gemma3_text", "phi3": "phi3"}


def genai_config(config, section: dict) -> dict:
    """The genai_config.json of an export: `config` the model's transformers config, `section` the `onnx` entry
    of the export's slimlm.json (kv_layers, kv_heads, head_dim, max_positions, file)."""
    context = int(section.get("max_positions") or getattr(config, "max_position_embeddings", 0) or 2048)
    eos = config.eos_token_id
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return {
        "model": {
            "bos_token_id": getattr(config, "bos_token_id", None),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": section.get("file", "model.onnx"),
                "head_size": int(section["head_dim"]),
                "hidden_size": int(config.hidden_size),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": int(config.num_attention_heads),
                "num_hidden_layers": len(section["kv_layers"]),
                "num_key_value_heads": int(section["kv_heads"]),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": TYPES.get(config.model_type, "llama"),
            "vocab_size": int(config.vocab_size),
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
