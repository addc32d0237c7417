"""U-GAT-IT: unsupervised generative attentional networks with AdaLIN, exact and fast."""

__version__ = "0.1.0"
