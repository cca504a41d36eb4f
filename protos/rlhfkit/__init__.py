"""rlhfkit: serve and improve an RLHF-trained language model.

This package's own folder is protos/rlhfkit (it holds the generated API stubs under
rlhfkit.v1); the subpackages server, kernels, training and clients map from the
repository's top-level folders (pyproject.toml, package-dir).
"""

__version__ = "0.1.0"
