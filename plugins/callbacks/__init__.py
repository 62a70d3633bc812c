"""Built-in run callbacks (``--callbacks``): ``csv`` (metrics.csv) and ``tensorboard``."""
