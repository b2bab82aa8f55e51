"""`lethe eval`: a forgetting audit that talks to any OpenAI-compatible server.

It only uses the public HTTP API (plus Lethe's admin API when given an admin key), so the same
numbers can be produced for Lethe and for a peer server such as a plain `vllm serve`.
"""
