"""``peftlab compare``: fine-tune one base model with each method on the same data and measure
the trade-off. :mod:`.options` (what to compare, how big), :mod:`.inputs` (the base and the
data every method shares), :mod:`.session` (how a method trains and is tested), :mod:`.search`
(the learning rate), :mod:`.store` (the comparison's state), :mod:`.runner` (the work per method
and the workers), :mod:`.measure` (memory and timing), :mod:`.results` (rows and statistics),
:mod:`.stats`, :mod:`.report` (tables), :mod:`.plots`."""

from peftlab.compare.options import CompareOptions
from peftlab.compare.report import render_report, render_table
from peftlab.compare.runner import run_compare

__all__ = ["CompareOptions", "render_report", "render_table", "run_compare"]
