"""The task ``search run`` compresses unless told: the digits CNN, which needs no download."""

DEFAULT_TASK = "search.tasks:digits"
