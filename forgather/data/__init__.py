"""Data for causal-LM training: corpora, document sources, tokenizers, packing, splits.

Modules (import the one you need; this package imports nothing, so `import forgather` stays light):
    corpus      the embedded stdlib corpus (pydoc topics + docstrings), cached jsonl
    sources     documents from text files, jsonl, Hugging Face datasets saved on disk
    tokenizer   cached byte-level BPE training -> transformers.PreTrainedTokenizerFast
    packing     tokenize + pack documents into fixed blocks with per-document position ids (torch)
    split       deterministic train/validation split by document
    loader      per-epoch seeded shuffling sampler; DataLoader that resumes mid-epoch (torch)
    cache       cache directory ($FORGATHER_CACHE_DIR), atomic writes, fingerprints
    prepare     corpora -> token shards on disk (Arrow, HF datasets), in worker processes, keyed, atomic
    stream      packed blocks streamed from prepared shards; shard-then-block order; exact resume (torch)
The Lightning side is `forgather.lightning.datamodule.TextDataModule` (docs/data.md for the streaming path).
"""
