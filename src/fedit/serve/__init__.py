"""`fedit serve`: the models a federation made, behind an OpenAI-compatible HTTP API and a
chat page (models → generation → api)."""
