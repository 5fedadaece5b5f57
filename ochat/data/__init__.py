"""Data: clean, filter, label (C-RLFT), fit to context, split and pre-tokenize conversations."""
