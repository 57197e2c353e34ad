"""fedmm: federated parameter-efficient finetuning of multimodal foundation models."""

import os

__version__ = "0.3.0"

# No network at run time: Flower's telemetry (an HTTP request per event, e.g. when a simulation
# or a SuperNode starts and stops) is off unless the user sets FLWR_TELEMETRY_ENABLED=1 before
# running fedmm.  Flower reads the variable when it is first imported, so it is set here, before
# any fedmm module imports flwr; the SuperLink / SuperNode processes fedmm starts inherit it.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
