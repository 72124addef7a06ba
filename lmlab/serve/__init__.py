"""`lmlab serve`: the web app (live dashboard, next-token playground) and the OpenAI-compatible API, in layers:
request (limits, refusals, body checks) -> runs -> guard -> completions -> playground -> app -> cli."""
