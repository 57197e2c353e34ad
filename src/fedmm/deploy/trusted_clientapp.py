"""One task at a fedmm site: check the run's app, then run the site's own fedmm ClientApp.

Started by the site executor (``deploy/supernode_process.py``) once per task the SuperNode
holds, as ``python -m fedmm.deploy.trusted_clientapp --runtime-api-address 127.0.0.1:PORT
[--trusted-app HASH ...] [--parent-pid PID]`` with the task's token in the environment
(``FEDMM_TASK_TOKEN``: a command line is readable by every local user, a process's environment
only by its owner).

Modelled on Flower's ``run_clientapp`` (``flwr/supernode/runtime/run_clientapp.py``): the same
``pull_task_input`` (message, context, run, FAB), ``push_message`` and ``push_task_output`` over
the SuperNode's Runtime API, with a task heartbeat.  Where Flower then calls
``install_from_fab(fab.content)`` and imports the FAB's ClientApp, this process

1. inspects the FAB without executing anything from it (``trust.inspect_fab``: its
   ``pyproject.toml`` read from the zip bytes, the site's ``trusted-apps``);
2. refused: logs ``refused run R (fab id, FAB hash, app hash): reason`` at the site and replies
   ``Error(ErrorCode.INVALID_FAB, "fedmm site refused this run's app: reason")`` to the message
   (the code Flower's own ``--trusted-entities`` check uses), so the server records why; nothing
   of the FAB is imported;
3. accepted: sets ``FEDMM_FAB_HASH`` / ``FEDMM_FAB_ID`` (the site's audit log reads them;
   ``FEDMM_APP_HASH`` too, the hash ``trusted-apps`` pins) and
   calls ``fedmm.federation.clientapp.app`` -- the fedmm installed at the site.

Exit codes: 0 the ClientApp replied, 3 the app was refused, 1 anything else (the reply then is
Flower's ``CLIENT_APP_RAISED_EXCEPTION`` error with the exception's class and text).

**Warm worker** (``--worker --status-fd N``): the same, for one task after another, in one
long-lived process per site and run (started by the site executor, which keys it by the run):
each line on stdin is a task's token; after each task the exit code above is written as a line
to file descriptor N.  Every task is checked exactly as a one-task process checks it (the FAB
inspected, the run's FAB hash compared, the refusal audited); what the process keeps between
tasks is what a Flower simulation worker keeps between messages: the imports and
``fedmm.runtime``'s one ``Runtime`` (model and encoded site data, keyed by model, data and
precision config).  It ends at the end of stdin.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("fedmm.site")
TOKEN_ENV = "FEDMM_TASK_TOKEN"
REFUSED_EXIT = 3


def run_task(runtime_api_address: str, token: str, trusted_apps: list[str]) -> int:
    """Pull the task, decide on its app, reply; returns the exit code (module docstring)."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    from fedmm.deploy.trust import inspect_fab

    for name in ("FEDMM_FAB_HASH", "FEDMM_FAB_ID", "FEDMM_APP_HASH"):  # set per accepted task
        os.environ.pop(name, None)
    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry,
    )  # fmt: skip
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details, code = SubStatus.FAILED, "the task failed before it started", 1
    try:
        message, context, run, fab = pull_task_input(client)
        verdict = inspect_fab(fab.content, trusted_apps)
        if verdict.fab_hash != run.fab_hash:
            verdict = type(verdict)(
                False, f"the FAB's bytes hash to {verdict.fab_hash}, not to the run's FAB hash "
                f"{run.fab_hash}", verdict.fab_hash, verdict.app_hash,
            )  # fmt: skip
        if not verdict.accepted:
            log.error("refused run %s (fab id %r, FAB hash %s, app hash %s): %s", run.run_id,
                      run.fab_id, verdict.fab_hash, verdict.app_hash or "-", verdict.reason)  # fmt: skip
            details = f"fedmm site refused this run's app: {verdict.reason}"
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=details), reply_to=message)
            code = REFUSED_EXIT
            audit_refusal(message, context, run.fab_id, verdict, details)
        else:
            log.info("run %s: app %s %s (app hash %s) accepted; running the site's own ClientApp",
                     run.run_id, verdict.name, verdict.version, verdict.app_hash)  # fmt: skip
            os.environ["FEDMM_FAB_HASH"] = verdict.fab_hash
            os.environ["FEDMM_FAB_ID"] = run.fab_id
            os.environ["FEDMM_APP_HASH"] = verdict.app_hash  # what trusted-apps pins
            from fedmm.federation.clientapp import app

            reply = app(message=message, context=context)
            status, details, code = SubStatus.COMPLETED, "", 0
    except Exception as exc:  # the ClientApp's own failures: reported as Flower reports them
        log.exception("the task failed")
        details = f"{type(exc)}:<'{exc}'>"
        if message is not None:
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message
            )
        code = 1
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception:
            log.exception("could not push the reply to the SuperNode")
            code = code or 1
        retry.max_tries = 1  # as Flower's exit handler: do not block the exit on retries
        push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()
    return code


def audit_refusal(message, context, fab_id: str, verdict, details: str) -> None:
    """The refused message and the refusal in the site's audit log (``federation/audit.py``),
    like every message the site's ClientApp handles; a site whose settings or log cannot be
    read logs that and still refuses."""
    from fedmm.federation import audit, consent
    from fedmm.federation.site import SiteSettings

    try:
        settings = SiteSettings.from_node_config(dict(context.node_config))
        path = consent.site_root(settings) / audit.AUDIT_FILE
        app = {"fab-id": fab_id, "fab-hash": verdict.fab_hash, "app-hash": verdict.app_hash}
        received = audit.append(path, audit.received_entry(message) | {"app": app})
        audit.append(path, audit.sent_entry(received, reason=details, ref="app-refused"))
    except Exception:
        log.exception("the refusal could not be written to the site's audit log")


def serve(runtime_api_address: str, trusted_apps: list[str], status_fd: int) -> int:
    """The warm worker's loop (module docstring): a task per token line on stdin, its exit code
    as a line on ``status_fd``; returns 0 at the end of stdin."""
    with os.fdopen(status_fd, "w", buffering=1) as status:
        for line in sys.stdin:
            token = line.strip()
            if not token:
                continue
            code = run_task(runtime_api_address, token, trusted_apps)
            status.write(f"{code}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's HOST:PORT")
    parser.add_argument("--trusted-app", action="append", default=[], metavar="HASH",
                        help="an app hash this site trusts (site.toml trusted-apps)")  # fmt: skip
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="end this task when that process (the site executor) ends")  # fmt: skip
    parser.add_argument(
        "--worker",
        action="store_true",
        help="warm worker: a task per token line on stdin (module docstring)",
    )
    parser.add_argument("--status-fd", type=int, default=None,
                        help="--worker: where each task's exit code is written")  # fmt: skip
    args = parser.parse_args(argv)
    if args.worker:
        if args.status_fd is None:
            parser.error("--worker needs --status-fd")
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)
        if args.parent_pid is not None:
            from flwr.supercore.app_utils import start_parent_process_monitor

            start_parent_process_monitor(args.parent_pid)
        return serve(args.runtime_api_address, args.trusted_app, args.status_fd)
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        print(f"trusted_clientapp: {TOKEN_ENV} is not set; this process is started by the site "
              "executor (fedmm site), not by hand", file=sys.stderr)  # fmt: skip
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per Runtime API call
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    return run_task(args.runtime_api_address, token, args.trusted_app)


if __name__ == "__main__":
    sys.exit(main())
