"""`charrnn train --tensorboard DIR`: the run's metrics and samples as TensorBoard events.

An event sink like the CLI's progress view: every validation record (the same fields and
values as the line appended to metrics.jsonl) becomes one scalar per field at its step,
and each validation sample a text entry. Written with PyTorch's own
torch.utils.tensorboard, which needs the `tensorboard` package (the optional extra
`pip install 'charrnn[tensorboard]'`); `tensorboard --logdir DIR` shows them live.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from charrnn.errors import UsageError
from charrnn.events import Event, Sample, Validation


class TensorBoardLog:
    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install 'charrnn[tensorboard]'") from None
        self.writer = SummaryWriter(str(log_dir))

    def __call__(self, event: Event) -> None:
        if isinstance(event, Validation):
            for key, value in asdict(event).items():
                if key != "step":
                    self.writer.add_scalar(key, value, event.step)
            self.writer.flush()
        elif isinstance(event, Sample):
            # Markdown would eat the text's line breaks and symbols: a code block keeps them.
            self.writer.add_text("sample", "    " + event.text.replace("\n", "\n    "), event.step)

    def close(self) -> None:
        self.writer.close()
