"""L8: the ``bagualu`` command line. ``main.py`` dispatches to one module per subcommand."""
