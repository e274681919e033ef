"""The pictures: `analysis` reads what a model learned (surprisal, unit activations, gates),
`report` renders it as one HTML page (`report.html`), `gradients` measures how far back
gradients reach, `tensorboard` writes a run's events for TensorBoard.

May import: the shared top-level modules, charrnn.data, charrnn.model, charrnn.store and
charrnn.infer. Never charrnn.training.
"""
