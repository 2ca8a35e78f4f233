"""Sub-commands of the ``peftlab`` CLI, one module each (see :mod:`peftlab.cli`)."""
