"""The models a server serves, by every name a client may use for them (`/v1/models`)."""

from __future__ import annotations

from ochat.serving import protocol as P
from ochat.serving.errors import APIError
from ochat.serving.served_model import ServedModel


class ServingModels:
    """A registry `name -> ServedModel`; the first model is the default one named in error messages."""

    def __init__(self, served: list[ServedModel]):
        if not served:
            raise ValueError("a server needs at least one model")
        self.served = list(served)

    @property
    def default(self) -> ServedModel:
        return self.served[0]

    def resolve(self, name: str) -> ServedModel:
        """The model called `name` (its served name, model type, an alias or its directory), else 404.
        A served name wins over another model's alias (two models of one type: each by its own name)."""
        for s in self.served:
            if name == s.name:
                return s
        for s in self.served:
            if name in s.names:
                return s
        known = ", ".join(f"'{s.name}'" for s in self.served)
        raise APIError(404, f"The model '{name}' does not exist; this server serves {known}", param="model",
                       code="model_not_found")

    def card(self, served: ServedModel) -> P.ModelCard:
        return P.ModelCard(id=served.name, ochat=served.card_info())

    def list(self) -> P.ModelList:
        return P.ModelList(data=[self.card(s) for s in self.served])
