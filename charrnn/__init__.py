"""charrnn: character-level language models (LSTM, GRU, RNN) you train, sample and evaluate."""

import warnings

# A CPU-only install of torch without numpy warns on import; charrnn never needs numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

__version__ = "0.1.0"
