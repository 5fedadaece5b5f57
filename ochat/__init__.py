"""ochat: raw chat conversations -> a served, evaluated chat model."""

__version__ = "0.1.0"
