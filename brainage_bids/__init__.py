"""brainage-bids: brain age from T1-weighted MRI as a BIDS App."""

from brainage_bids._version import __version__

__all__ = ["__version__"]
