"""U-GAT-IT: unsupervised generative attentional networks with AdaLIN, exact and fast.

The package reads as the paper: `models` (the networks), `norms` (AdaILN, ILN, spectral norm), `losses`,
`trainer` (the update rule), `data`, `train` (runs), `inference`, `metrics` / `evaluate`, `export`, `cli`; the
networks of the official TensorFlow code, which the authors' released models need, are `tf_models` (read by
`tf_checkpoint`, imported by `tf_import`); the fast path is a layer of its own, `ugatit.fast`. Importing the
package changes nothing in the process.
"""

__version__ = "0.1.0"
