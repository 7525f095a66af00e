"""The ``sawquant`` command line (installed as ``sawquant.cli``): click + rich, nothing more."""
