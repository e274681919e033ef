"""Training: `run` turns "train this text with these settings" into a `Plan` (`plan`: every
decision made: device, dtype, batch layout, size), the `Trainer` runs it (truncated BPTT,
AdamW, validation, checkpoints, Ctrl-C), `trainstate` is what resumes exactly,
`schedule` the learning rate, `sizing` the model for the text and budget, `average` the
weight average, `finetune` the vocabulary surgery of --init-from.

May import: the shared top-level modules, charrnn.data, charrnn.model, charrnn.store and
charrnn.infer (validation scores and training samples are inference's).
"""
