"""Model conversion between Hugging Face checkpoints and Forgather model directories.

    hf_to_forgather(src, dst, ...)   Llama (incl. Llama-3 RoPE scaling, tied embeddings), Mistral, Qwen3
                                     -> a standalone Forgather model directory (forgather.models.export)
    forgather_to_hf(src, dst, ...)   a Forgather model directory -> the matching Hugging Face family,
                                     loadable by transformers and vLLM without remote code
Both can add tokens (a list, or the reference Forgather's YAML token file with bos/eos/pad/unk roles), set a chat
template, and grow the embedding (and untied head) to match (`vocab.py`), and
both write the destination whole through a staging directory, refusing an existing one unless asked (`output.py`).
The modules import torch and transformers; this package file imports nothing, so `import forgather.convert`
stays torch-free. Entry points: `forgather.convert.hf:hf_to_forgather` and `forgather.convert.hf:forgather_to_hf`.
"""
