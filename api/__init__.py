"""inferbox REST API: Litestar app factory (KServe v2, OpenAI embeddings, metrics)."""
