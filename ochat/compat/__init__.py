"""Seed-era entry points (the commands the OpenChat README and model cards print), as argv alias tables.

Each module maps the old flags onto the dataclass that defines today's command (`TrainArgs`,
`ServeConfig`), through `ochat.utils.config_cli`, so an old spelling cannot drift from the new option.
"""
