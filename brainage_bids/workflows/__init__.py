"""nipype workflow factories (pure functions of keyword arguments)."""
