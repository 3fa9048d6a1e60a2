"""`llava-gm serve`: the engine behind an OpenAI-compatible HTTP API (FastAPI + uvicorn) and a web page.

app.py (routes, streaming, errors), schema.py (the request, checked), sources.py (where images may come
from), scheduler.py (continuous batching on one engine thread), static/index.html (the page at /).
"""
