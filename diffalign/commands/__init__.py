"""The ``diffalign`` subcommands, one module each.

A command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
``diffalign.cli`` discovers every public module in this package, so a new command is one new
file. Modules import heavy libraries (torch, diffusers) inside ``run`` so that ``--help`` is fast.
"""
