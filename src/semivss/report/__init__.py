"""semivss.report: the self-contained HTML experiment report of ``semivss report`` (one run, or
several side by side): sources.py reads run / evaluation folders, plots.py draws the SVG figures,
html.py writes the page."""

from semivss.report.html import render_report, write_report
from semivss.report.sources import Source, Still, load_source

__all__ = ["Source", "Still", "load_source", "render_report", "write_report"]
