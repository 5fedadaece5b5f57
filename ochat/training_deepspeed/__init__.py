"""Seed-era entry point: `deepspeed --module ochat.training_deepspeed.train ...` maps onto `ochat train`."""
