"""Several worker processes on one machine sharing the listening sockets (`twistd mim --workers N`).

One Python process uses one core. With `cluster.workers = N` (or `--workers N`) the process that
twistd runs is a supervisor: it binds every client listener once, from the same endpoint strings
a single server uses (so tcp, tcp6, unix and systemd sockets all work, and a port that cannot be
bound stops the start as it does today), never accepts on them itself, and runs N workers, each
`twistd -n mim --worker I`: a whole server and a cluster node of its own (`<cluster.node>.I`)
that adopts the inherited sockets (`AdoptedStreamServerEndpoint`). The kernel hands each new
connection to one of the processes accepting on the socket. STARTTLS happens inside the XMPP
stream, so nothing about TLS is in the way of adoption (SO_REUSEPORT would need each worker to
bind by itself, which a UNIX socket or a systemd socket cannot do).

A worker's file descriptors: 0 is /dev/null; 1 and 2 are pipes to the supervisor, which puts
the worker's log (JSON lines, whatever the configured format) into its own log with the worker's
index; 3 is its start report (twistd's status pipe protocol: "0", or "1 <line>"); 4 onwards are
the listening sockets, in the order of `[[listeners]]`.

Twisted's ProcessMonitor restarts processes too, but passes no file descriptors and does not
wait for its processes at stop: the supervisor here does both. A worker that ends while the
supervisor runs is restarted at once if it ran for a while, after a back-off doubling from
RESTART_DELAY to MAX_RESTART_DELAY if it keeps dying young. SIGTERM to the supervisor stops
every worker (each drains as a single server does) and waits for them; SIGHUP is passed on.
Each worker has its own admin socket and metrics endpoint (see `worker_config`).
"""

import ctypes
import dataclasses
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints, error, protocol
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from mim_twisted.config import MAX_UNIX_SOCKET_PATH, Config, ConfigError, load_config
from mim_twisted.listeners import describe_address, endpoint_arguments
from mim_twisted.logs import LogOutput
from mim_twisted.startreport import StartReport

log = Logger()

# A worker's start report and its first listening socket (see the module's docstring).
STATUS_FD = 3
FIRST_LISTENER_FD = 4

# Seconds a worker must live to be restarted without delay.
HEALTHY_RUN = 10.0
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0

# Seconds a stopping worker gets to drain before it is killed: a single server's stop waits
# SHUTDOWN_GRACE and then up to three PRESENCE_STOP_TIMEOUTs for the work its clients left.
STOP_TIMEOUT = 60.0

# twistd's parent reads at most this many bytes from the status pipe; a worker's is the same.
STATUS_LIMIT = 100

PR_SET_PDEATHSIG = 1


def worker_config(config: Config, index: int, node: str) -> Config:
    """The config of worker ``index`` (from 1) of the supervisor whose node name is ``node``:
    its cluster node name (`<node>.<index>`), admin socket and metrics endpoint are its own.
    The admin socket is `<admin socket>.<index>`; a TCP metrics endpoint gets port + index - 1
    (9090, 9091, ... by default), a UNIX one `<path>.<index>`."""
    cluster = dataclasses.replace(config.cluster, node=f"{node}.{index}")
    admin = dataclasses.replace(config.admin, socket=worker_admin_socket(config, index))
    metrics = dataclasses.replace(
        config.metrics, endpoint=_nth_endpoint(config.metrics.endpoint, index)
    )
    return dataclasses.replace(config, cluster=cluster, admin=admin, metrics=metrics)


def worker_admin_socket(config: Config, index: int) -> str:
    """The admin socket of worker ``index`` (mimctl asks every worker's)."""
    return f"{config.admin_socket}.{index}"


def _nth_endpoint(description: str, index: int) -> str:
    kind, *arguments = endpoint_arguments(description)
    if kind in ("tcp", "tcp6"):
        for position, argument in enumerate(arguments):
            name, _, value = argument.rpartition("=")
            if name in ("", "port"):
                arguments[position] = f"{name}={int(value) + index - 1}".lstrip("=")
                break
    elif kind == "unix":
        for position, argument in enumerate(arguments):
            name, _, value = argument.rpartition("=")
            if name in ("", "address"):
                arguments[position] = f"{argument}.{index}"
                break
    return ":".join([kind, *arguments])


def check_workers(config: Config, workers: int) -> None:
    """ConfigError (one line) unless ``workers`` processes can serve ``config``."""
    if workers > 1 and not config.cluster.enabled:
        raise ConfigError(
            f"{config.source or 'the default configuration'}: {workers} workers need"
            " cluster.enabled = true (each worker is a cluster node)"
        )
    socket_path = os.fsencode(worker_admin_socket(config, workers))
    if workers > 1 and config.admin.enabled and len(socket_path) > MAX_UNIX_SOCKET_PATH:
        raise ConfigError(
            f"{config.source}: admin.socket: too long for {workers} workers' sockets"
            f" (<path>.{workers}: at most {MAX_UNIX_SOCKET_PATH} bytes)"
        )
    if workers > 1 and config.metrics.enabled:
        kind = endpoint_arguments(config.metrics.endpoint)[0]
        if kind not in ("tcp", "tcp6", "unix"):
            raise ConfigError(
                f"{config.source}: metrics.endpoint: with several workers it must be a"
                f' "tcp:", "tcp6:" or "unix:" endpoint, one per worker (got "{kind}:")'
            )


def adopted_endpoint(reactor: Any, fileno: int) -> endpoints.AdoptedStreamServerEndpoint:
    """An endpoint for the listening socket inherited as ``fileno``, of whatever family it is."""
    inherited = socket.socket(fileno=fileno)
    family = inherited.family
    inherited.detach()
    return endpoints.AdoptedStreamServerEndpoint(reactor, fileno, family)


def end_with_parent() -> None:
    """Have the kernel send this process SIGTERM when the supervisor dies (Linux), so that a
    supervisor killed with SIGKILL leaves no workers behind; they drain as on any stop."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the supervisor died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


class _NoConnections(protocol.ServerFactory):
    """The supervisor's factory on the sockets it binds: it never accepts on them."""

    noisy = False


class WorkerProcess(protocol.ProcessProtocol):
    """One run of a worker: its log lines into the supervisor's log, its start report, its end."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.report: defer.Deferred[None] = defer.Deferred()
        # Fires with the ProcessDone or ProcessTerminated (a Failure would take the errback path).
        self.ended: defer.Deferred[Exception] = defer.Deferred()
        self._status = b""
        self._partial = {1: b"", 2: b""}
        self.pid: int | None = None
        self.start_failed = False  # it said so, and is stopping by itself

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # the transport forgets it once the process has ended

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == STATUS_FD:
            self._status = (self._status + data)[:STATUS_LIMIT]
            return
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            self._log_line(line, fd)

    def childConnectionLost(self, fd: int) -> None:
        if fd == STATUS_FD:
            self._reported()
        elif self._partial.get(fd):
            line, self._partial[fd] = self._partial[fd], b""
            self._log_line(line, fd)

    def processEnded(self, reason: Failure) -> None:
        self._reported()
        self.ended.callback(reason.value)

    def _reported(self) -> None:
        if self.report.called:
            return
        if self._status == b"0":
            self.report.callback(None)
        else:
            self.start_failed = True
            # No report at all: the worker ended before its start finished.
            line = self._status[2:].decode("utf-8", "replace") or (
                f"mim: could not start: worker {self.index} ended while starting (see the log)"
            )
            self.report.errback(WorkerStartFailed(line))

    def _log_line(self, line: bytes, fd: int) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if not text:
            return
        try:
            event = eventFromJSON(text)
        except ValueError:
            event = None
        if not isinstance(event, dict) or "log_namespace" not in event:
            # Output that is not the worker's log: a traceback before its log began, say.
            stream = "stderr" if fd == 2 else "stdout"
            log.warn("worker {index} {stream}: {line}", index=self.index, stream=stream, line=text)
            return
        event.pop("text", None)  # made again by the supervisor's own format
        event["worker"] = self.index
        # The text format shows log_system in the place of "namespace#level".
        level = event.get("log_level")
        level_name = getattr(level, "name", "info")
        event["log_system"] = f"worker {self.index} {event['log_namespace']}#{level_name}"
        globalLogPublisher(event)


class WorkerStartFailed(Exception):
    """A worker's start failed; str() is its one-line report."""


@dataclasses.dataclass
class _Worker:
    index: int
    process: WorkerProcess | None = None
    started_at: float = 0.0
    delay: float = RESTART_DELAY
    restart: Any = None  # the IDelayedCall of a pending restart


class WorkerSupervisor(service.MultiService):
    """Binds the listeners and keeps `count` workers running on them (see the module's
    docstring). Under twistd the outcome of the start goes to `start_report` once every worker
    has reported its own."""

    def __init__(
        self,
        config: Config,
        count: int,
        worker_command: Callable[[int], list[str]],
        reactor: Any = None,
        prepare: Callable[[], None] | None = None,
    ) -> None:
        service.MultiService.__init__(self)
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.count = count
        self.worker_command = worker_command
        self.reactor = reactor
        # What must exist once before any worker starts (the data directory, a generated
        # certificate): made here, so that the workers do not race each other to make it.
        self.prepare = prepare
        self.ports: list[IListeningPort] = []
        self.workers = [_Worker(index) for index in range(1, count + 1)]
        self.ready: defer.Deferred = defer.Deferred()
        self.start_report: StartReport | None = None
        self.log_output: LogOutput | None = None
        self._starting: defer.Deferred | None = None

    def setServiceParent(self, parent: service.IServiceCollection) -> None:
        super().setServiceParent(parent)
        if self.log_output is not None:
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self.log_output.observer)

    def startService(self) -> None:
        if self.start_report is not None:
            self.start_report.claim()
        super().startService()
        self._starting = defer.ensureDeferred(self._start())
        self._starting.addCallbacks(self._started, self._start_failed)

    async def _start(self) -> None:
        if self.prepare is not None:
            self.prepare()
        for listener in self.config.listeners:
            endpoint = endpoints.serverFromString(self.reactor, listener.endpoint)
            port = await endpoint.listen(_NoConnections())
            # Bound and listening; the workers accept, the supervisor only holds the socket.
            port.stopReading()
            self.ports.append(port)
            log.info(
                "Listening for XMPP clients on {address} (domains: {domains}) in {count} workers",
                address=describe_address(port.getHost()),
                domains=", ".join(self.config.server.domains),
                count=self.count,
            )
        for worker in self.workers:
            self._spawn(worker)
        await defer.gatherResults(
            [worker.process.report for worker in self.workers], consumeErrors=True
        ).addErrback(lambda failure: failure.value.subFailure)

    def _started(self, result: object) -> None:
        log.info("{count} workers started", count=self.count)
        if self.start_report is not None:
            self.start_report.started()
        self.ready.callback(self)

    def _start_failed(self, failure: Failure) -> None:
        if failure.check(WorkerStartFailed):
            line = str(failure.value)
        elif failure.check(error.CannotListenError, OSError):
            line = f"mim: could not start: {' '.join(failure.getErrorMessage().split())}"
        else:
            log.failure("mim-twisted could not start", failure)
            line = f"mim: could not start: {failure.type.__name__}: {failure.getErrorMessage()}"
        log.error("{line}", line=line)
        if self.start_report is not None:
            self.start_report.failed(line)
        else:
            self.ready.errback(WorkerStartFailed(line))

    def _spawn(self, worker: _Worker) -> None:
        worker.restart = None
        process = WorkerProcess(worker.index)
        worker.process = process
        worker.started_at = self.reactor.seconds()
        child_fds: dict[int, str | int] = {0: "w", 1: "r", 2: "r", STATUS_FD: "r"}
        for offset, port in enumerate(self.ports):
            child_fds[FIRST_LISTENER_FD + offset] = port.fileno()
        env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "LISTEN_PID")}
        command = self.worker_command(worker.index)
        self.reactor.spawnProcess(
            process, command[0], command, env=env, path=os.getcwd(), childFDs=child_fds
        )
        # The worker's stdin: closed at once, a worker reads nothing from it.
        process.transport.closeStdin()
        log.info("Worker {index} started (pid {pid})", index=worker.index, pid=process.pid)
        process.ended.addCallback(self._ended, worker, process)

    def _ended(self, reason: Exception, worker: _Worker, process: WorkerProcess) -> None:
        if worker.process is not process:
            return
        worker.process = None
        how = _how_it_ended(reason)
        if not self.running:
            log.info(
                "Worker {index} (pid {pid}) stopped ({how})",
                index=worker.index,
                pid=process.pid,
                how=how,
            )
            return
        ran = self.reactor.seconds() - worker.started_at
        if ran >= HEALTHY_RUN:
            worker.delay = RESTART_DELAY
            delay = 0.0
        else:
            delay = worker.delay
            worker.delay = min(worker.delay * 2, MAX_RESTART_DELAY)
        log.error(
            "Worker {index} (pid {pid}) ended ({how}) after {ran:.1f} s; restarting it in"
            " {delay:g} s",
            index=worker.index,
            pid=process.pid,
            how=how,
            ran=ran,
            delay=delay,
        )
        worker.restart = self.reactor.callLater(delay, self._spawn, worker)

    def reload(self) -> None:
        """SIGHUP: the supervisor's own log level, and the signal passed on to each worker."""
        try:
            level = load_config(self.config.source).log.level
        except ConfigError as error:
            log.error("Reload refused, the running configuration stays: {error}", error=error)
        else:
            if self.log_output is not None:
                self.log_output.set_level(level)
        for worker in self.workers:
            self._signal(worker, "HUP")

    def _signal(self, worker: _Worker, name: str) -> None:
        if worker.process is None:
            return
        try:
            worker.process.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def stopService(self) -> defer.Deferred:
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        await super().stopService()
        running = []
        for worker in self.workers:
            if worker.restart is not None and worker.restart.active():
                worker.restart.cancel()
            if worker.process is not None:
                running.append(worker.process)
                # One whose start failed is stopping already: a SIGTERM during its stop would
                # find its reactor stopping (twistd logs ReactorNotRunning with a traceback).
                if not worker.process.start_failed:
                    self._signal(worker, "TERM")
        if running:
            log.info("Stopping {count} workers", count=len(running))
        kills = [self.reactor.callLater(STOP_TIMEOUT, _kill, process) for process in running]
        await defer.DeferredList([process.ended for process in running])
        for kill in kills:
            if kill.active():
                kill.cancel()
        ports, self.ports = self.ports, []
        await defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports])


def _kill(process: WorkerProcess) -> None:
    log.error(
        "Worker {index} did not stop within {timeout:g} s: killed",
        index=process.index,
        timeout=STOP_TIMEOUT,
    )
    try:
        process.transport.signalProcess("KILL")
    except error.ProcessExitedAlready:
        pass


def _how_it_ended(reason: Exception) -> str:
    if getattr(reason, "signal", None):
        return f"signal {signal.Signals(reason.signal).name}"
    return f"exit status {getattr(reason, 'exitCode', None)}"


def worker_command(options: Any, config: Config, index: int) -> list[str]:
    """The command line of worker ``index``: this twistd, in the foreground, with no pidfile,
    named after the supervisor's node (whose default name has the supervisor's pid)."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    command = [sys.executable, twistd, "-n", "--pidfile=", "mim", "--worker", str(index)]
    command += ["--cluster-node", config.cluster.node]
    if options["config"] is not None:
        command += ["-c", os.path.abspath(options["config"])]
    if options["log-traffic"]:
        command.append("--log-traffic")
    return command
