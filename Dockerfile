# brainage-bids container: a BIDS App (docker run IMAGE BIDS_DIR OUTPUT_DIR participant|group|train)
#
#   docker build -t brainage-bids .
#   docker run --rm --read-only --tmpfs /tmp -v $PWD/bids:/data:ro -v $PWD/out:/out \
#       -v $PWD/work:/work brainage-bids /data /out participant -w /work
#
# Build arguments (all optional):
#   BASE_IMAGE       any Debian 12 (bookworm) based image; a site without Docker Hub passes a
#                    local one (scripts/build_image.sh makes one with debootstrap)
#   INSTALL_FSL      1: FSL's bet and flirt from FSL's own conda channel (not the whole FSL);
#                    0: skip (the pure-pip ANTs backend is always there)
#   FSL_PACKAGES     the FSL conda packages (pinned as in FSL 6.0.7.7)
#   TORCH_SPEC       the torch requirement
#   TORCH_INDEX_URL  where torch comes from: the CPU build by default; for the CUDA variant pass
#                    a CUDA index (https://download.pytorch.org/whl/cuXYZ for your driver) or
#                    https://pypi.org/simple (PyPI's Linux torch is a CUDA build); empty: use
#                    the pip configuration below
#   PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS / PIP_CERT: a mirror, a local wheel
#                    folder and its CA bundle for an air-gapped build. Mount folders and
#                    certificates at build time (buildah bud --volume); they are never copied
#                    into the image.
#   VERSION / VCS_REF / BUILD_DATE: image labels
#
# Nothing is downloaded at run time: templates and shipped weights are package data.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG INSTALL_FSL=1
ARG FSL_CONDA_CHANNEL=https://fsl.fmrib.ox.ac.uk/fsldownloads/fslconda/public
ARG FSL_PACKAGES="fsl-bet2=2111.4 fsl-flirt=2111.2 fsl-avwutils"
ARG MICROMAMBA_URL=https://github.com/mamba-org/micromamba-releases/releases/download/1.5.8-0/micromamba-linux-64
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Declared without a value: unset unless passed, so pip's own defaults apply.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# curl only for fetching micromamba (FSL); removed again in the FSL step.
RUN apt-get update -qq \
 && apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates \
        libgomp1 $([ "${INSTALL_FSL}" = "1" ] && echo curl) \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# FSL's bet and flirt only, from FSL's conda channel, into /opt/fsl; the build fails when
# either is missing.
RUN if [ "${INSTALL_FSL}" = "1" ]; then \
      curl -fsSL -o /usr/local/bin/micromamba "${MICROMAMBA_URL}" \
      && chmod +x /usr/local/bin/micromamba \
      && MAMBA_ROOT_PREFIX=/tmp/mamba /usr/local/bin/micromamba create -y -q -p /opt/fsl \
           -c "${FSL_CONDA_CHANNEL}" -c conda-forge ${FSL_PACKAGES} \
      && rm -rf /usr/local/bin/micromamba /tmp/mamba /opt/fsl/pkgs \
      && test -x /opt/fsl/bin/bet && test -x /opt/fsl/bin/flirt \
      && apt-get purge -y -q --autoremove curl; \
    else mkdir -p /opt/fsl/bin; fi
ENV FSLDIR=/opt/fsl \
    FSLOUTPUTTYPE=NIFTI_GZ \
    FSLMULTIFILEQUIT=TRUE

# The app in its own virtual environment; torch first so that the chosen build is used.
COPY pyproject.toml README.md LICENSE NOTICE /src/
COPY brainage_bids /src/brainage_bids
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC}" \
 && /opt/venv/bin/pip install -q /src \
 && mkdir -p /usr/share/doc/brainage-bids \
 && cp /src/LICENSE /src/NOTICE /usr/share/doc/brainage-bids/ \
 && rm -rf /src /root/.cache /tmp/* \
 && /opt/venv/bin/brainage-bids --version

# Non-root user. With --read-only only /tmp (a tmpfs) and the mounted output and work
# directories need to be writable.
RUN useradd --create-home --uid 1000 --shell /bin/bash brainage \
 && mkdir -p /work && chown brainage /work
USER brainage
WORKDIR /work
# Declared late: a new value (a new date) must not invalidate the cached steps above.
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
# One thread per process by default: --nprocs and --omp-nthreads set the parallelism.
ENV PATH=/opt/venv/bin:/opt/fsl/bin:${PATH} \
    HOME=/home/brainage \
    MPLCONFIGDIR=/tmp/matplotlib \
    NIPYPE_NO_ET=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
    BRAINAGE_WORK_DIR=/work \
    BRAINAGE_BIDS_CONTAINER=brainage-bids:${VERSION}

LABEL org.opencontainers.image.title="brainage-bids" \
      org.opencontainers.image.description="Brain age from T1w MRI (weight-shared spatial-attention 3D CNN) as a BIDS App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.source="https://github.com/brainage-bids/brainage-bids" \
      org.opencontainers.image.licenses="Apache-2.0"

ENTRYPOINT ["brainage-bids"]
CMD ["--help"]
