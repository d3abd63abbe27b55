"""Benchmark scripts (``make bench-*``), each ``python -m dg_lightning.bench.<name>``; shared helpers live in
:mod:`dg_lightning.cli_utils` (``split_overrides``), not here."""
