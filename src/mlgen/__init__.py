"""mlgen: synthetic training data and classifiers for labels nobody has annotated."""

__version__ = "0.1.0"
