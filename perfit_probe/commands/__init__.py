"""Sub-commands of the CLI, one typed function each: its parameters (and the fields of the
``perfit_probe.config`` classes it takes) are the command's options (``perfit_probe.cli``)."""
