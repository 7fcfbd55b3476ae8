#!/usr/bin/env bash
# Build the brainage-bids image without Docker or Docker Hub, then run it on the shipped sample.
#
#   bash scripts/build_image.sh [--model PATH] [--rebuild-base] [--tag NAME] [--out DIR]
#
# 1. base: a minimal Debian bookworm root filesystem made with debootstrap from the Debian
#    mirror apt uses, cached as a tarball under ~/.cache/brainage-bids and imported into
#    buildah as localhost/brainage-base:bookworm (--rebuild-base makes it again);
# 2. build: `buildah bud` of the Dockerfile on that base with the FSL step off; pip inside the
#    build uses this machine's pip configuration (index, extra indexes, wheel folders, CA
#    bundle), passed as build arguments and mounted read-only, never copied into the image;
# 3. run: participant then group on examples/ixi-sample inside the image, the way
#    `docker run --read-only --tmpfs /tmp --network none` runs it: the image's root filesystem
#    mounted read-only, only /tmp, /out and /work writable, no network, as the image's
#    non-root user;
# 4. check the output file list against .circleci/expected_outputs.txt, then print the build
#    time, the image size and the run time.
#
# --model PATH: a models folder (or .safetensors file / model card) written by the train level,
# mounted read-only; without it the image's shipped default model is used.
# Needs root, buildah, debootstrap and util-linux (apt-get install buildah debootstrap).
# On a machine that must stay responsive: nice -n 19 ionice -c3 bash scripts/build_image.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

MODEL=""
REBUILD_BASE=0
TAG=""
OUT=""
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL=$2; shift 2 ;;
        --rebuild-base) REBUILD_BASE=1; shift ;;
        --tag) TAG=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "build_image: unknown argument $1" >&2; usage 2 >&2 ;;
    esac
done

die() { echo "build_image: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, buildah storage, mount namespaces)"
for tool in buildah debootstrap unshare chroot tar; do
    command -v "$tool" >/dev/null 2>&1 \
        || die "$tool is missing (Debian: apt-get install -y buildah debootstrap)"
done
if [ -n "$MODEL" ]; then
    [ -e "$MODEL" ] || die "--model $MODEL does not exist"
    MODEL=$(realpath "$MODEL")
fi

VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' brainage_bids/_version.py)
TAG=${TAG:-localhost/brainage-bids:$VERSION}
OUT=${OUT:-$(mktemp -d /tmp/brainage-image-run.XXXXXX)}
OUT=$(realpath -m "$OUT")
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/brainage-bids
BASE_TAR=$CACHE/debian-bookworm-minbase.tar
BASE_IMAGE=localhost/brainage-base:bookworm
# buildah's OCI runtime needs cgroup controllers that nested or hybrid-cgroup machines lack;
# chroot isolation needs nothing but root.
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

# ---------------------------------------------------------------- 1. the debootstrap base
debian_mirror() {
    # the first Debian mirror apt is configured with (deb822 .sources or sources.list)
    local uri
    uri=$(grep -hs -m1 -E '^URIs:.*/debian/?$' /etc/apt/sources.list.d/*.sources \
          | awk '{print $2}' || true)
    [ -n "$uri" ] || uri=$(grep -hs -m1 -E '^deb .*/debian/? ' /etc/apt/sources.list \
                           /etc/apt/sources.list.d/*.list | awk '{print $2}' || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

BASE_NOTE="cached $BASE_TAR"
if [ "$REBUILD_BASE" = 1 ] || [ ! -s "$BASE_TAR" ]; then
    BASE_START=$(date +%s)
    MIRROR=${DEBIAN_MIRROR:-$(debian_mirror)}
    echo "== debootstrap bookworm (minbase) from $MIRROR"
    mkdir -p "$CACHE"
    ROOTFS=$(mktemp -d /tmp/brainage-rootfs.XXXXXX)
    trap 'rm -rf "$ROOTFS"' EXIT
    debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $CACHE/debootstrap.log"
    # no package caches, no host resolver settings in the image
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin \
           "$ROOTFS"/var/lib/apt/lists/*
    : >"$ROOTFS/etc/resolv.conf"
    tar --numeric-owner -C "$ROOTFS" -cf "$BASE_TAR.partial" .
    mv "$BASE_TAR.partial" "$BASE_TAR"
    rm -rf "$ROOTFS"
    trap - EXIT
    buildah rmi "$BASE_IMAGE" >/dev/null 2>&1 || true
    BASE_NOTE="debootstrap took $(( $(date +%s) - BASE_START )) s, $(du -h "$BASE_TAR" | cut -f1)"
fi
if ! buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "== importing $BASE_TAR as $BASE_IMAGE"
    ctr=$(buildah from scratch)
    buildah add --quiet "$ctr" "$BASE_TAR" / >/dev/null
    buildah config --env LANG=C.UTF-8 --env \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd /bin/bash --label org.opencontainers.image.base.name=debian:bookworm-minbase \
        "$ctr"
    buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
fi

# ------------------------------------------- 2. the build, with this machine's pip setup
pip_setting() {
    # pip's own precedence: PIP_<OPTION> in the environment, then its configuration files
    local var value
    var=PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')
    value=${!var:-}
    if [ -z "$value" ] && python3 -m pip --version >/dev/null 2>&1; then
        value=$(python3 -m pip config get "global.$1" 2>/dev/null || true)
    fi
    echo "$value"
}
VCS_REF=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg INSTALL_FSL=0
            --build-arg "VERSION=$VERSION"
            --build-arg "VCS_REF=$VCS_REF" --build-arg "BUILD_DATE=$BUILD_DATE"
            # again as labels: buildah reuses a cached LABEL step even when these changed
            --label "org.opencontainers.image.revision=$VCS_REF"
            --label "org.opencontainers.image.created=$BUILD_DATE"
            --build-arg "TORCH_SPEC=torch==${TORCH_VERSION:-2.13.0}"
            # empty: torch comes through the same pip configuration as everything else
            --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}")
VOLUMES=()
declare -A MOUNTED=()
mount_local() {
    # a local folder named by a pip option goes in read-only at the same path; a PEP 503
    # "simple" folder brings its parent (its pages link to ../../files)
    local path=${1#file://}
    case "$path" in /*) ;; *) return ;; esac
    [ -e "$path" ] || return 0
    [ "$(basename "$path")" = simple ] && path=$(dirname "$path")
    [ -n "${MOUNTED[$path]:-}" ] && return
    MOUNTED[$path]=1
    VOLUMES+=(--volume "$path:$path:ro")
}
for option in index-url extra-index-url find-links; do
    value=$(pip_setting "$option")
    [ -n "$value" ] || continue
    var=PIP_$(echo "$option" | tr 'a-z-' 'A-Z_')
    BUILD_ARGS+=(--build-arg "$var=$value")
    for item in $value; do mount_local "$item"; done
done
CERT=$(pip_setting cert)
if [ -n "$CERT" ] && [ -f "$CERT" ]; then
    # not at its own path: the image's ca-certificates package writes the system bundle
    VOLUMES+=(--volume "$(realpath "$CERT"):/run/build-ca.crt:ro")
    BUILD_ARGS+=(--build-arg PIP_CERT=/run/build-ca.crt)
fi

echo "== buildah bud -> $TAG (FSL step off)"
BUILD_START=$(date +%s)
buildah bud --layers -f Dockerfile -t "$TAG" \
    "${BUILD_ARGS[@]}" "${VOLUMES[@]}" "$REPO"
BUILD_SECONDS=$(( $(date +%s) - BUILD_START ))
IMAGE_SIZE=$(buildah images --format '{{.Size}}' "$TAG" | head -n1)

# ------------------------------------------------ 3. participant + group inside the image
image_config() { buildah inspect --type image --format "$1" "$TAG"; }
mapfile -t IMAGE_ENV < <(image_config '{{range .OCIv1.Config.Env}}{{println .}}{{end}}' \
                         | sed '/^$/d')
read -r -a ENTRYPOINT <<<"$(image_config '{{range .OCIv1.Config.Entrypoint}}{{.}} {{end}}')"
IMAGE_USER=$(image_config '{{.OCIv1.Config.User}}')
WORKDIR=$(image_config '{{.OCIv1.Config.WorkingDir}}')

CTR=$(buildah from --quiet "$TAG")
cleanup() { buildah umount "$CTR" >/dev/null 2>&1 || true; buildah rm "$CTR" >/dev/null 2>&1 || true; }
trap cleanup EXIT
ROOT=$(buildah mount "$CTR")
USER_IDS=$(awk -F: -v u="$IMAGE_USER" '$1 == u {print $3 ":" $4}' "$ROOT/etc/passwd")
[ -n "$USER_IDS" ] || die "user $IMAGE_USER not found in the image"
# mount points (in this throwaway container's layer, not in the image)
mkdir -p "$ROOT/data" "$ROOT/out" "$ROOT/models"
mkdir -p "$OUT/out" "$OUT/work"
chown -R "$USER_IDS" "$OUT/out" "$OUT/work"
MODEL_ARGS=()
MODEL_MOUNT=""
if [ -n "$MODEL" ]; then
    if [ -d "$MODEL" ]; then
        MODEL_MOUNT=$MODEL; MODEL_ARGS=(--model /models)
    else
        MODEL_MOUNT=$(dirname "$MODEL"); MODEL_ARGS=(--model "/models/$(basename "$MODEL")")
    fi
fi

in_image() {
    # docker run --read-only --tmpfs /tmp --network none -v sample:/data:ro -v out:/out
    #            -v work:/work [-v models:/models:ro] IMAGE "$@", without a container engine;
    # no network at all, so a download at run time would fail the proof
    unshare --mount --net --fork -- bash -euo pipefail -c '
        root=$1 ids=$2 workdir=$3 bids=$4 out=$5 work=$6 models=$7; shift 7
        mount --make-rprivate /
        mount --bind "$root" "$root" && mount -o remount,bind,ro "$root"
        mount -t proc proc "$root/proc"
        mount --bind /dev "$root/dev" && mount -t tmpfs -o mode=1777 shm "$root/dev/shm"
        mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
        mount --bind "$bids" "$root/data" && mount -o remount,bind,ro "$root/data"
        mount --bind "$out" "$root/out"
        mount --bind "$work" "$root/work"
        if [ -n "$models" ]; then
            mount --bind "$models" "$root/models" && mount -o remount,bind,ro "$root/models"
        fi
        exec chroot --userspec="$ids" "$root" /usr/bin/env -i -C "$workdir" "$@"
    ' in_image "$ROOT" "$USER_IDS" "${WORKDIR:-/}" "$REPO/examples/ixi-sample" "$OUT/out" \
        "$OUT/work" "$MODEL_MOUNT" "${IMAGE_ENV[@]}" "${ENTRYPOINT[@]}" "$@"
}

echo "== participant + group on examples/ixi-sample inside $TAG" \
     "(read-only, no network, user $IMAGE_USER)"
RUN_START=$(date +%s)
in_image /data /out participant -w /work --nprocs 2 --omp-nthreads 1 "${MODEL_ARGS[@]}"
in_image /data /out group "${MODEL_ARGS[@]}"
RUN_SECONDS=$(( $(date +%s) - RUN_START ))

# ------------------------------------------------------------------------ 4. check, report
bash .circleci/list_outputs.sh "$OUT/out" >"$OUT/outputs.txt"
if ! diff -u .circleci/expected_outputs.txt "$OUT/outputs.txt"; then
    die "the output files differ from .circleci/expected_outputs.txt (above)"
fi
ROWS=$(( $(wc -l <"$OUT/out/group_brainage.tsv") - 1 ))
[ "$ROWS" -eq 4 ] || die "group_brainage.tsv has $ROWS rows, expected 4"

cat <<EOF
== done
image:             $TAG ($IMAGE_SIZE, FSL step off)
base:              $BASE_IMAGE ($BASE_NOTE)
build time:        ${BUILD_SECONDS} s (buildah bud)
participant+group: ${RUN_SECONDS} s (4 IXI heads, --nprocs 2 --omp-nthreads 1)
outputs:           $OUT/out ($(wc -l <"$OUT/outputs.txt") files, as expected)
EOF
