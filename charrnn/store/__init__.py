"""What a trained model is, on disk: the checkpoint format (`checkpoint`: written atomically,
loaded without pickled code, each kind of damage named) and the run directory
(`rundir`: where a run keeps best.pt, last.pt, its config and its metrics, and how one is found).

May import: the shared top-level modules, charrnn.data and charrnn.model.
"""
