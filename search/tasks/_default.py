"""What a task is unless told, kept free of PyTorch for the command line's start: the task
``search run`` compresses (the digits CNN, which needs no download), and the metric span a study
judges its front over (``Task.metric_window``)."""

DEFAULT_TASK = "search.tasks:digits"
METRIC_WINDOW = 0.1  # 10 points of accuracy, 0.1 of cosine similarity: a metric in [0, 1]
