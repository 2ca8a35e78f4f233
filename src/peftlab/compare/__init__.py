"""``peftlab compare``: fine-tune one base model with each method on the same data and measure
the trade-off. :mod:`.options` (what to compare), :mod:`.runner` (training and scoring each
method), :mod:`.measure` (memory and timing), :mod:`.report` (tables), :mod:`.plots`."""

from peftlab.compare.options import CompareOptions
from peftlab.compare.report import print_table, render_report
from peftlab.compare.runner import run_compare

__all__ = ["CompareOptions", "print_table", "render_report", "run_compare"]
