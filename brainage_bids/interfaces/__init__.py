"""nipype interfaces of brainage-bids (heavy libraries are imported lazily)."""
