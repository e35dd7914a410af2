"""llmops: a Kubernetes operator for preparing data, training and serving language models."""

from importlib.metadata import PackageNotFoundError, version

GROUP = "llmops.dev"
VERSION = "v1alpha1"

try:
    __version__ = version("llmops")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
