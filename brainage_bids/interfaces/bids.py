"""nipype interfaces that write derivatives: every output file goes through here."""

from __future__ import annotations

import shutil
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from brainage_bids.derivatives import derivative_path
from brainage_bids.io import atomic_path, atomic_write_json


def _extension(path: str) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".json", ".tsv", ".mat", ".txt", ".h5", ".svg", ".png"):
        if name.endswith(ext):
            return ext
    return Path(path).suffix


class _DerivativesSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the file to store")
    base_directory = traits.Str(mandatory=True, desc="the derivatives root (OUTPUT_DIR)")
    source_entities = traits.Dict(mandatory=True, desc="BIDS entities of the source T1w")
    suffix = traits.Str(mandatory=True)
    datatype = traits.Str("anat", usedefault=True)
    entities = traits.Dict(desc="entities of the derivative: space, res, desc, from/to/mode")
    sidecar = traits.Dict(desc="JSON sidecar written beside the file")
    after = traits.List(desc="derivatives that must be written before this one (the record "
                             "is written last, so that a record means a complete image)")


class _DerivativesSinkOutputSpec(TraitedSpec):
    out_file = File(desc="where the derivative was written")


class DerivativesSink(SimpleInterface):
    """Copy a file into the derivatives tree under its BIDS name, atomically.

    The name comes from :func:`brainage_bids.derivatives.derivative_path`, never from
    hand-made strings, and the file appears under its final name only when complete.
    """

    input_spec = _DerivativesSinkInputSpec
    output_spec = _DerivativesSinkOutputSpec
    always_run = True  # a rerun re-creates outputs a user deleted

    def _run_interface(self, runtime):
        inputs = self.inputs
        entities = inputs.entities if isdefined(inputs.entities) else {}
        target = derivative_path(Path(inputs.base_directory), inputs.source_entities,
                                 suffix=inputs.suffix, extension=_extension(inputs.in_file),
                                 datatype=inputs.datatype, **entities)
        with atomic_path(target) as tmp:
            shutil.copyfile(inputs.in_file, tmp)
        if isdefined(inputs.sidecar) and inputs.sidecar:
            sidecar = target.with_name(target.name.split(".")[0] + ".json")
            atomic_write_json(sidecar, inputs.sidecar)
        self._results["out_file"] = str(target)
        return runtime

