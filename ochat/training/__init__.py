"""Padding-free packed fine-tuning with the C-RLFT loss (`ochat train`)."""
