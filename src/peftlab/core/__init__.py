"""The library core: adapters on a model.

Configs, the one wrapper and its units, injection, composition, the method registry, the
model class, PEFT-format checkpoints and weighted combination. Nothing here imports an
application (data, training, compare, serving, the command line); see docs/architecture.md.
"""
