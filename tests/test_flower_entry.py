"""fedmm's simulation goes through Flower's Simulation Engine without a deprecated entry point:
a run logs no Flower deprecation notice, and the private engine entry it calls still takes what
fedmm passes (a Flower upgrade that changes it fails here, not in a user's run)."""

from __future__ import annotations

import inspect
import logging
import warnings

from fedmm.engine import run_method


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_engine_entry_takes_what_fedmm_passes():
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    params = inspect.signature(_run_simulation).parameters
    passed = {"num_supernodes", "exit_event", "client_app", "server_app", "backend_name",
              "backend_config"}  # fmt: skip
    assert passed <= set(params)
    assert hasattr(EventType, "PYTHON_API_RUN_SIMULATION_LEAVE")


def test_a_simulated_run_logs_no_flower_deprecation_notice(tiny_cfg):
    flwr_logger = logging.getLogger("flwr")  # Flower's own logger (flwr.supercore.logger)
    handler = Records()
    flwr_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = run_method(tiny_cfg.with_overrides({"fed.rounds": 1, "fed.clients": 2}))
    finally:
        flwr_logger.removeHandler(handler)
    assert [h["round"] for h in run["history"]] == [1]  # the run did go through Flower
    assert any(r.name.startswith("flwr") for r in handler.records)  # the handler saw Flower
    notices = [r.getMessage() for r in handler.records if "DEPRECATED" in r.getMessage()]
    assert notices == []
    flower_warnings = [str(w.message) for w in caught if "/flwr/" in w.filename
                       and issubclass(w.category, DeprecationWarning | FutureWarning)]  # fmt: skip
    assert flower_warnings == []
