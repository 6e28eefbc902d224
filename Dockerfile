# syntax=docker/dockerfile:1
# The image every Pod of kuberay/*.yaml runs (`image: fleet:0.1.0`): Ray with fleet
# installed from a wheel built from this repository, running as the image's `ray` user.
#   docker build -t fleet:0.1.0 .
# The base image's Ray and Python versions, `rayVersion` in kuberay/*.yaml and the Ray pin
# in pyproject.toml must agree: tests/deploy/test_package.py checks them, and builds the
# wheel with this file's own command.

# Stage 1: the wheel, from the package's sources only (.dockerignore keeps everything
# else out of the build context). Root here only so that setuptools may write its build
# directory beside the sources; nothing of this stage but the wheel reaches the image.
FROM rayproject/ray:2.60.0-py311 AS wheel
USER root
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fleet/ fleet/
RUN python -m pip wheel --no-deps --no-cache-dir --wheel-dir /dist .

# Stage 2: the runtime. The wheel is installed with its dependencies into the image's
# Python (Ray itself is already there, at the version the pin admits); it is bind-mounted,
# so neither it nor the sources end up in a layer.
FROM rayproject/ray:2.60.0-py311
USER ray
RUN --mount=type=bind,from=wheel,source=/dist,target=/tmp/dist \
    python -m pip install --no-cache-dir /tmp/dist/fleet-*.whl
# Not in the package: the Ray job entrypoints (kuberay/rayjob.yaml runs jobs/load.py)
# and the Serve configs, for `serve deploy` or `python jobs/load.py` from inside a Pod.
WORKDIR /home/ray/fleet
COPY --chown=ray:users jobs/ jobs/
COPY --chown=ray:users serve_configs/ serve_configs/
