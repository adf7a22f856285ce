"""Text conditioning: the `(word:1.2)` weighting syntax, 75-token chunks, TI/XTI embeddings ->
text-encoder states.
"""
