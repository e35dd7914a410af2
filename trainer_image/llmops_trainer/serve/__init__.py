"""The inference server of ModelDeployment: an OpenAI-compatible HTTP API over the trained model,
with a KV cache and continuous batching.

    python -m llmops_trainer.serve --config /etc/llmops/modeldeployment.json
    python -m llmops_trainer.serve --model-dir DIR [--port P]

Modules: `batching` (admission and the bounded queue), `text` (incremental detokenization,
stop strings, chat template), `protocol` (OpenAI request schemas), `loading` (model folders),
`engine` (the decoding loop and the bounded wait for room), `sampling` (penalties, sampling,
log-probabilities), `replies` (response bodies and chunks), `metrics`, `api` (HTTP routes, the
OpenAPI document) and `__main__` (the process: draining on SIGTERM).
"""
