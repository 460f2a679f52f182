"""Data: the built-in corpus, user text, sentencepiece tokenizers, packed token files, data modules."""
