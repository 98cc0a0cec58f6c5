"""Remote nodes: models served by any OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama, a
hosted API), declared in the graph with `kind: openai` (service/router/graph.py).

- client.py  one upstream URL: auth, timeouts, error mapping, bounded SSE framing
- relay.py   upstream chunks -> the gateway's chunks (id/model rewritten as bytes)
- runner.py  the pipeline's remote branch: request pass-through, retry, health, fallback
"""
