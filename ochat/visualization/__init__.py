"""Conversation embeddings in an interactive 3D map (OpenChat's dataset visualizer).

embed (sentence-transformers or an OpenAI-compatible endpoint) -> project (UMAP to 3D, K-Means
colours) -> html (one self-contained Plotly page)."""
