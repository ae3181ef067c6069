"""Inference server and client: an OpenAI-compatible HTTP API over a model directory.

    backend.py   Backend: loads a Forgather or Hugging Face model directory, tokenizes, applies the chat
                 template, and streams generated text (temperature, top_p, stop strings, seed, max_tokens)
    protocol.py  the OpenAI request bodies (pydantic), response and chunk bodies, error bodies
    app.py       create_app(backend, ...): the FastAPI app (GET /v1/models, POST /v1/completions,
                 POST /v1/chat/completions, server-sent events); one worker thread serializes generation;
                 an API key guards every path
    server.py    serve(): refuses a non-loopback host without a key, binds the port, loads, runs uvicorn
    client.py    Client: streaming completions and chat for `forgather inf client`, over httpx
The `serve` extra (fastapi, uvicorn, httpx, openai) provides the web stack. This file imports nothing, so
`import forgather.serve` stays free of torch and of the web stack.
"""
