"""Sub-commands of the CLI, one module each (``add_arguments`` and ``run``)."""
