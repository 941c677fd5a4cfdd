"""The router: SpotServe's request manager. Clients talk only to it.

It serves the public `Inference` gRPC service and an OpenAI-compatible HTTP API, queues
requests and dispatches them to pipeline drivers (`Worker.Submit`), records every token it
has sent (the commit log), and resumes a request on another pipeline when its pipeline
drains, dies or disappears, so that the client sees one uninterrupted stream.

Layout: pure logic (no sockets, no torch) in `validation`, `commit_log`, `dispatch`,
`topology`, `load_signal`, `text`, `errors` and `auth`; the async core in `scheduler`
(bounded queue, slots), `resume` (where and how an interrupted request continues) and
`router` (one request's life); thin I/O shells in
`worker_client` (calls to drivers), `server` (gRPC Inference and Control), `openai_http`
(aiohttp), `metrics` (Prometheus), `tokenizer` (HF tokenizers, chat template), `app` (one
process: both servers in one event loop) and `cli`. The resume rules are in `resume`'s
docstring.
"""
