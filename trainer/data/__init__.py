"""Host-side data: corpora, tokenizers and grain pipelines."""
