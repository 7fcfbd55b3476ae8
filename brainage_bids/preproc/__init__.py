"""T1w preprocessing without FSL: the pure-pip (antspyx) backend and registration QC.

``ants_backend`` holds pure functions (file in, files out) and imports antspyx lazily, so that
importing this package, or using :func:`~brainage_bids.preproc.qc.registration_qc` on the FSL
backend's outputs, does not load ANTs.
"""
