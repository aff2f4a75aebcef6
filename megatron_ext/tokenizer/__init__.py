"""Tekken tokenizers: building small ones from mistral-common's bundled vocabulary, and aligning two."""
