"""adaptkit's command line (installed as ``adaptkit.cli``)."""
