"""leantune: adapt language models cheaply, and report what it cost."""

__version__ = "0.1.0"
