"""U-GAT-IT: unsupervised generative attentional networks with AdaLIN, exact and fast."""

import os

# Large CPU tensors (the discriminators' 134 MB weight gradients, the Adam temporaries) are allocated afresh at every
# step, and first touching 4 KiB pages costs more than the arithmetic on them: PyTorch's allocator backs allocations
# of 2 MiB and more with transparent huge pages when this is set (read once, at the first allocation of the process,
# so it only takes effect when ugatit is imported before any tensor exists). Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
