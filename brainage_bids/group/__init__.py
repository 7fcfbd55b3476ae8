"""Group level: gather the per-image brain-age records, correct the gap's age bias, tabulate.

Records are found from the BIDS dataset's T1w images through
:func:`brainage_bids.derivatives.derivative_path`, the same naming the participant level
used, so the selection (labels, filters) means the same at both levels and no file name is
guessed. Outputs, each written atomically: ``group_brainage.tsv`` (one row per image, BIDS
``n/a`` for missing values), its sidecar ``group_brainage.json`` (every column described,
plus the metrics and the bias-correction coefficients with their origin) and
``group_brainage.html``.

One job per module: :mod:`.records` finds and reads the records, participants.tsv and the
model card; :mod:`.correction` fits and applies the bias corrections; :mod:`.table` builds,
describes and writes the table; :mod:`.level` runs the level (:func:`.level.run_group`).
"""
