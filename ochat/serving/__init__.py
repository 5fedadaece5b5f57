"""OpenAI-compatible serving: `ochat serve` (FastAPI + uvicorn) over a continuous-batching engine."""
