"""The daemon's HTTP API: OpenAI- and Ollama-compatible routes over one loaded engine.

app.py builds the ASGI app; auth.py guards it; slot.py queues generations onto the engine;
openai.py and ollama.py translate each API's requests and responses; schemas.py holds the request
schemas that both validate bodies and make up the served /openapi.json."""
