"""Pre-training data: the embedded corpus, tokenizers, readers of text/JSONL/datasets sources, the token
cache, example building by the reference code's rules, and the step -> batch schedule."""
