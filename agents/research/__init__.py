"""The research-team demo: agents that read a day's papers, record findings as facts with
citations, detect contradictions with earlier days, and keep a shared digest.

`agents.research.corpus` holds the papers (three days of invented abstracts) and the text
format the agents read them in.
"""
