"""Models, tokenizers and corpora as users bring them: PaddleNLP folders, vocab.txt-only vocabularies,
PaddleNLP model names, output folders of earlier runs."""
