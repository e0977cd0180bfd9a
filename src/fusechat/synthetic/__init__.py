"""Synthetic chat skills with exact answer distributions (``skills``), a run's mixture and held-out items of them
(``mixture``, the config's ``synthetic:`` section), and the checker that scores answers to them (``checker``)."""
