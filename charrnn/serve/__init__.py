"""`charrnn serve`: the OpenAI-compatible HTTP server. `app` holds the routes, `schemas` the
request bodies and their checks, `served` a model as served, `engine` the
continuous-batching decoder each model has (`sequence`: what it serves; `prompts`: how it
reads their prompts; `runner`: the one thread that steps them), `bridge` and `stream` carry characters to the clients (server-sent events), `gate`
checks every request (size, API key), `metrics` counts for Prometheus, `chat` writes chat
messages as the corpus would, and `server` runs it all under uvicorn. The playground page
is `playground.html`.

May import: the shared top-level modules, charrnn.data, charrnn.model, charrnn.store and
charrnn.infer. Never charrnn.training. Needs the serve extra (fastapi, uvicorn, ...).
"""
