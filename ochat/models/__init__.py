"""Model preparation: tiny test models, special tokens, context extension, weight deltas."""
