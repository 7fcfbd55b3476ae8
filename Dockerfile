# brainage-bids container: a BIDS App (docker run IMAGE BIDS_DIR OUTPUT_DIR participant|group|train)
#
# Build arguments (all optional):
#   BASE_IMAGE     any Debian/Ubuntu image; a site without Docker Hub passes a local one
#   INSTALL_FSL    1: FSL's bet and flirt from FSL's own conda packages (not the whole FSL); 0: skip
#   TORCH_SPEC     the torch requirement; TORCH_INDEX_URL its index (CPU build by default;
#                  the CUDA variant: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124)
#   PIP_FIND_LINKS / PIP_INDEX_URL / PIP_EXTRA_INDEX_URL: a local wheel folder or mirror for an
#                  air-gapped build (mounted at build time, never baked into the image)
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG INSTALL_FSL=1
ARG FSL_CONDA_CHANNEL=https://fsl.fmrib.ox.ac.uk/fsldownloads/fslconda/public
ARG MICROMAMBA_URL=https://micro.mamba.pm/api/micromamba/linux-64/latest
ARG TORCH_SPEC="torch>=2.3"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=""
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG VERSION=0.1.0

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update -qq \
 && apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates \
        bzip2 curl libgomp1 \
 && rm -rf /var/lib/apt/lists/*

# FSL's bet and flirt only, from FSL's conda channel, into /opt/fsl.
RUN if [ "${INSTALL_FSL}" = "1" ]; then \
      curl -fsSL "${MICROMAMBA_URL}" | tar -xj -C /usr/local bin/micromamba \
      && /usr/local/bin/micromamba create -y -q -p /opt/fsl -c "${FSL_CONDA_CHANNEL}" \
           -c conda-forge fsl-bet2 fsl-flirt fsl-avwutils \
      && /usr/local/bin/micromamba clean -y -a \
      && rm /usr/local/bin/micromamba; \
    else mkdir -p /opt/fsl/bin; fi
ENV FSLDIR=/opt/fsl \
    FSLOUTPUTTYPE=NIFTI_GZ \
    FSLMULTIFILEQUIT=TRUE

# The app in its own virtual environment; torch first so that its CPU build is used.
COPY pyproject.toml README.md LICENSE /src/
COPY brainage_bids /src/brainage_bids
RUN python3 -m venv /opt/venv \
 && . /opt/venv/bin/activate \
 && pip install -q --upgrade pip \
 && pip install -q --index-url "${TORCH_INDEX_URL}" ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} "${TORCH_SPEC}" \
 && pip install -q /src \
 && rm -rf /src /root/.cache

# Non-root user; HOME and the work directory are writable even with --read-only and a tmpfs.
RUN useradd --create-home --uid 1000 --shell /bin/bash brainage \
 && mkdir -p /work && chown brainage /work
USER brainage
WORKDIR /work
ENV PATH=/opt/venv/bin:/opt/fsl/bin:${PATH} \
    HOME=/home/brainage \
    MPLCONFIGDIR=/tmp/matplotlib \
    NIPYPE_NO_ET=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
    BRAINAGE_BIDS_CONTAINER=brainage-bids:${VERSION}

LABEL org.opencontainers.image.title="brainage-bids" \
      org.opencontainers.image.description="Brain age from T1w MRI (weight-shared spatial-attention 3D CNN) as a BIDS App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENTRYPOINT ["brainage-bids"]
CMD ["--help"]
