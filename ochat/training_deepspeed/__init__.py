"""Seed-era module path: `deepspeed --module ochat.training_deepspeed.train ...` (see ochat.compat.training)."""
