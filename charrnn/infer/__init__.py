"""Inference, shared by the CLI, the Python API, the server and the exporters: the packed
step-by-step decoders (`decode`; `lanes`, two side by side for the server's wide
batches; `rows`, the batch-invariant row products of the C kernel `_rows.c`), sampling with temperature, top-k/top-p and the rest of the controls
(`sample`), scoring a text (`evaluate`: loss, bits per character, perplexity) and the
API's `Model` (`api`: charrnn.load).

May import: the shared top-level modules, charrnn.data, charrnn.model and charrnn.store.
Never charrnn.training: `import charrnn; charrnn.load(...)` does not import training.
"""
