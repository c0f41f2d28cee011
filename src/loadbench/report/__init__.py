"""Reports: a results directory as tables, plots, findings, Markdown and HTML."""
